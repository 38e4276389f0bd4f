//! A DNS responder for tests: answers PTR queries on 127.0.0.1:PORT inside
//! a test namespace, from a table, each answer on a thread of its own (so a
//! slow one delays no other), until dropped.

use std::{
    collections::HashMap,
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use super::Netns;

/// What the responder answers for a name.
pub enum Answer {
    Name(&'static str, Duration),
    ServFail,
}

/// Answers PTR queries on 127.0.0.1:`port` inside `ns` until dropped.
pub struct DnsServer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DnsServer {
    pub fn start(ns: &Netns, port: u16, answers: HashMap<&'static str, Answer>) -> Self {
        let socket = ns.run(|| UdpSocket::bind(("127.0.0.1", port)).unwrap());
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let answers = Arc::new(answers);
            let mut buf = [0u8; 512];
            while !stopping.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let query = buf[..n].to_vec();
                let socket = socket.try_clone().unwrap();
                let answers = Arc::clone(&answers);
                // Each answer on its own thread: a slow one delays no other.
                thread::spawn(move || {
                    let name = question_name(&query);
                    let (rcode, ptr, delay) = match answers.get(name.as_str()) {
                        Some(Answer::Name(ptr, delay)) => (0, Some(*ptr), *delay),
                        Some(Answer::ServFail) => (2, None, Duration::ZERO),
                        None => (3, None, Duration::ZERO),
                    };
                    thread::sleep(delay);
                    let _ = socket.send_to(&response(&query, rcode, ptr), from);
                });
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn question_name(query: &[u8]) -> String {
    let mut labels = Vec::new();
    let mut pos = 12;
    while pos < query.len() && query[pos] != 0 {
        let len = query[pos] as usize;
        labels.push(String::from_utf8_lossy(&query[pos + 1..pos + 1 + len]).into_owned());
        pos += 1 + len;
    }
    labels.join(".")
}

fn response(query: &[u8], rcode: u8, ptr: Option<&str>) -> Vec<u8> {
    let question_end = 12 + question_name(query).len() + 2 + 4;
    let mut msg = query[..question_end].to_vec();
    msg[2] = 0x81;
    msg[3] = 0x80 | rcode;
    msg[6] = 0;
    msg[7] = ptr.is_some() as u8;
    // No authority or additional records (a query's EDNS OPT record is not
    // echoed).
    msg[8..12].fill(0);
    if let Some(name) = ptr {
        msg.extend_from_slice(&[0xC0, 12, 0, 12, 0, 1, 0, 0, 1, 44]);
        let mut rdata = Vec::new();
        for label in name.split('.') {
            rdata.push(label.len() as u8);
            rdata.extend_from_slice(label.as_bytes());
        }
        rdata.push(0);
        msg.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        msg.extend_from_slice(&rdata);
    }
    msg
}

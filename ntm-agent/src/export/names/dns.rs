//! A minimal reverse-DNS (PTR) client over UDP: one question, one answer,
//! with the answer's TTL. Blocking, with a timeout; the name resolver runs it
//! on worker threads so that counting and scraping never wait for it.

use std::{
    fs, io,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

/// What a PTR query came back with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PtrAnswer {
    /// The name (without the trailing dot) and how long it may be cached.
    Name { name: String, ttl: Duration },
    /// The server says there is no name (NXDOMAIN, or no PTR record).
    NoName { ttl: Duration },
    /// The server failed (SERVFAIL, REFUSED, ...), with its response code.
    ServerError(u8),
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("no answer from {server} within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("talking to {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("malformed answer from {server}: {what}")]
    Malformed {
        server: SocketAddr,
        what: &'static str,
    },
}

/// How long "no name" answers are remembered when the server gives no TTL.
const NEGATIVE_TTL: Duration = Duration::from_secs(300);

/// The first `nameserver` of /etc/resolv.conf, port 53.
pub fn system_nameserver() -> Option<SocketAddr> {
    let text = fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// The reverse-lookup name of an address: 4.3.2.1.in-addr.arpa or the
/// nibble form under ip6.arpa.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(72);
            for byte in v6.octets().iter().rev() {
                name.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            name.push_str("ip6.arpa");
            name
        }
    }
}

fn encode_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(96);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // recursion desired
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // 1 question
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 12, 0, 1]); // PTR, IN
    q
}

/// Reads a (possibly compressed) name at `pos`; returns it and the position
/// after it in the original record.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    // Bounded: a message of 512+ bytes cannot hold more pointers than this.
    for _ in 0..128 {
        let len = *msg.get(pos)? as usize;
        if len & 0xC0 == 0xC0 {
            let target = ((len & 0x3F) << 8) | *msg.get(pos + 1)? as usize;
            end.get_or_insert(pos + 2);
            pos = target;
            continue;
        }
        if len == 0 {
            return Some((labels.join("."), end.unwrap_or(pos + 1)));
        }
        let label = msg.get(pos + 1..pos + 1 + len)?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        pos += 1 + len;
    }
    None
}

/// Decodes a response to the query with `id`.
pub fn decode_answer(msg: &[u8], id: u16) -> Result<PtrAnswer, &'static str> {
    if msg.len() < 12 {
        return Err("shorter than a DNS header");
    }
    if u16::from_be_bytes([msg[0], msg[1]]) != id {
        return Err("answer to another query");
    }
    if msg[2] & 0x80 == 0 {
        return Err("not a response");
    }
    let rcode = msg[3] & 0x0F;
    let questions = u16::from_be_bytes([msg[4], msg[5]]);
    let answers = u16::from_be_bytes([msg[6], msg[7]]);
    let authority = u16::from_be_bytes([msg[8], msg[9]]);
    let mut pos = 12;
    for _ in 0..questions {
        let (_, next) = read_name(msg, pos).ok_or("bad question name")?;
        pos = next + 4;
    }
    let mut negative_ttl = None;
    let records = answers as usize + authority as usize;
    for index in 0..records {
        let (_, next) = read_name(msg, pos).ok_or("bad record name")?;
        let header = msg.get(next..next + 10).ok_or("record cut short")?;
        let rtype = u16::from_be_bytes([header[0], header[1]]);
        let ttl = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let rdlen = u16::from_be_bytes([header[8], header[9]]) as usize;
        let rdata = next + 10;
        if rdata + rdlen > msg.len() {
            return Err("record data cut short");
        }
        if index < answers as usize && rtype == 12 && rcode == 0 {
            let (name, _) = read_name(msg, rdata).ok_or("bad PTR name")?;
            if !name.is_empty() {
                return Ok(PtrAnswer::Name {
                    name: name.trim_end_matches('.').to_ascii_lowercase(),
                    ttl: Duration::from_secs(ttl as u64),
                });
            }
        }
        if index >= answers as usize && rtype == 6 {
            // SOA in the authority section: its TTL bounds negative caching.
            negative_ttl = Some(Duration::from_secs(ttl as u64));
        }
        pos = rdata + rdlen;
    }
    match rcode {
        0 | 3 => Ok(PtrAnswer::NoName {
            ttl: negative_ttl.unwrap_or(NEGATIVE_TTL),
        }),
        other => Ok(PtrAnswer::ServerError(other)),
    }
}

/// Asks `server` for the PTR record of `ip`, waiting at most `timeout`.
pub fn query_ptr(server: SocketAddr, ip: IpAddr, timeout: Duration) -> Result<PtrAnswer, DnsError> {
    let io_err = |source| DnsError::Io { server, source };
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let socket = UdpSocket::bind(bind).map_err(io_err)?;
    socket.connect(server).map_err(io_err)?;
    // The socket (and its random source port) is this query's alone; the id
    // only adds a little more against spoofed answers.
    let id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u16 ^ (d.as_secs() as u16))
        .unwrap_or(0x6e74);
    socket
        .send(&encode_query(id, &reverse_name(ip)))
        .map_err(io_err)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(DnsError::Timeout { server, timeout });
        }
        socket.set_read_timeout(Some(left)).map_err(io_err)?;
        match socket.recv(&mut buf) {
            Ok(n) => match decode_answer(&buf[..n], id) {
                Ok(answer) => return Ok(answer),
                // A stray datagram: keep waiting for ours.
                Err("answer to another query") => continue,
                Err(what) => return Err(DnsError::Malformed { server, what }),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(DnsError::Timeout { server, timeout });
            }
            Err(e) => return Err(io_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_name("198.18.0.2".parse().unwrap()),
            "2.0.18.198.in-addr.arpa"
        );
        assert_eq!(
            reverse_name("2001:2::1".parse().unwrap()),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.2.ip6.arpa"
        );
    }

    /// Builds a response the way servers do: the question, then one PTR
    /// answer whose owner name is a compression pointer to the question.
    fn response(id: u16, rcode: u8, ptr: Option<&str>, ttl: u32) -> Vec<u8> {
        let query = encode_query(id, "2.0.18.198.in-addr.arpa");
        let mut msg = query.clone();
        msg[2] = 0x81;
        msg[3] = 0x80 | rcode;
        if let Some(name) = ptr {
            msg[7] = 1;
            msg.extend_from_slice(&[0xC0, 12, 0, 12, 0, 1]);
            msg.extend_from_slice(&ttl.to_be_bytes());
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

    #[test]
    fn decodes_names_ttls_and_failures() {
        assert_eq!(
            decode_answer(&response(7, 0, Some("Laptop.home.arpa"), 600), 7),
            Ok(PtrAnswer::Name {
                name: "laptop.home.arpa".into(),
                ttl: Duration::from_secs(600)
            })
        );
        assert_eq!(
            decode_answer(&response(7, 3, None, 0), 7),
            Ok(PtrAnswer::NoName { ttl: NEGATIVE_TTL })
        );
        assert_eq!(
            decode_answer(&response(7, 2, None, 0), 7),
            Ok(PtrAnswer::ServerError(2))
        );
        assert!(decode_answer(&response(7, 0, Some("x.y"), 1), 8).is_err());
        assert!(decode_answer(&[0; 5], 0).is_err());
        // Cut anywhere, never a panic.
        let full = response(9, 0, Some("www.bbc.co.uk"), 60);
        for cut in 0..full.len() {
            let _ = decode_answer(&full[..cut], 9);
        }
    }

    #[test]
    fn compression_loops_end() {
        let mut msg = response(1, 0, None, 0);
        msg[5] = 1;
        // A pointer to itself in the question.
        msg.truncate(12);
        msg.extend_from_slice(&[0xC0, 12, 0, 12, 0, 1]);
        assert!(decode_answer(&msg, 1).is_err());
    }
}

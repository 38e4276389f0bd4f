//! Real clients' handshakes for the names-from-handshakes tests: a
//! ClientHello as `openssl s_client` or `curl` sends it (captured at a
//! local listener), and the QUIC Initials aioquic sends (from PyPI, in the
//! environment `cargo xtask test` prepares).
#![allow(dead_code)]

use std::{
    io::Read,
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ntm_agent::names::hello::client_hello::{HelloInRecords, hello_in_records};

const WAIT: Duration = Duration::from_secs(10);

/// What a client started by `start` (given the listener's port) sent on
/// its connection, up to its whole ClientHello.
pub fn client_hello_of(what: &str, start: impl FnOnce(u16) -> Child) -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let mut child = start(port);
    let since = Instant::now();
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(_) if since.elapsed() < WAIT => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                let _ = child.kill();
                panic!("{what} did not connect: {e}");
            }
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut sent = Vec::new();
    let mut buf = [0u8; 4096];
    while !matches!(hello_in_records(&sent), Ok(HelloInRecords::Whole(_))) {
        let n = stream.read(&mut buf).unwrap_or(0);
        assert!(
            n > 0,
            "{what} ended before its ClientHello was whole: {sent:02x?}"
        );
        sent.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    let _ = child.kill();
    let _ = child.wait();
    sent
}

pub fn quiet(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// The ClientHello `openssl s_client` sends for `name` with `extra`
/// arguments, as it sent it.
pub fn openssl_client_hello_with(name: &str, extra: &[&str]) -> Vec<u8> {
    client_hello_of("openssl", |port| {
        quiet(
            Command::new("openssl")
                .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
                .args(["-servername", name])
                .args(extra),
        )
    })
}

/// The ClientHello `openssl s_client` sends for `name`, as it sent it.
pub fn openssl_client_hello(name: &str) -> Vec<u8> {
    openssl_client_hello_with(name, &[])
}

/// A ClientHello past one full-size segment, as post-quantum key shares
/// make them: `openssl s_client` for `name` with a large key share
/// (ffdhe8192) and 60 ALPN protocols, about 2.5 KB.
pub fn large_openssl_client_hello(name: &str) -> Vec<u8> {
    let alpns: Vec<String> = (0..60).map(|i| format!("x-{i:026}")).collect();
    let hello = openssl_client_hello_with(
        name,
        &["-groups", "ffdhe8192:x25519", "-alpn", &alpns.join(",")],
    );
    assert!(hello.len() > 2_000, "a large hello: {} bytes", hello.len());
    hello
}

/// The Initials aioquic sends first to `name` (QUIC `version` 1 or 2),
/// with `alpns` extra ALPN protocols (60 take the hello past one Initial).
pub fn aioquic_initials(name: &str, version: u8, alpns: usize) -> Vec<Vec<u8>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let python =
        std::env::var("NTM_PYTHON").unwrap_or_else(|_| format!("{root}/target/pyenv/bin/python"));
    let script = r#"
import sys, time
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicProtocolVersion
name, version, alpns = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = QuicConfiguration(
    is_client=True,
    server_name=name,
    alpn_protocols=["h3"] + ["x-%026d" % i for i in range(alpns)],
    supported_versions=[QuicProtocolVersion.VERSION_2 if version == "2" else QuicProtocolVersion.VERSION_1],
)
connection = QuicConnection(configuration=config)
now = time.time()
connection.connect(("192.0.2.1", 443), now=now)
for data, _ in connection.datagrams_to_send(now=now):
    print(data.hex())
"#;
    assert!(
        std::path::Path::new(&python).exists(),
        "no Python environment with aioquic at {python}: run `cargo xtask test`"
    );
    let out = Command::new(&python)
        .args(["-c", script, name, &version.to_string(), &alpns.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (cargo xtask test prepares it)"));
    assert!(
        out.status.success(),
        "aioquic: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

//! Talking to the agent's endpoint and to a real Prometheus from tests.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::Netns;

/// A child process killed (and reaped) on drop, so that nothing outlives a
/// failed test.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh folder under the target directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ntm-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// GET `path` from 127.0.0.1:`port` inside `ns`: (status, body).
pub fn http_get(ns: &Netns, port: u16, path: &str) -> Option<(u16, String)> {
    ns.run(|| {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(conn, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut response = String::new();
        conn.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())?;
        Some((status, body))
    })
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(200));
    }
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of a PromQL query that yields one sample, if it does.
pub fn promql(ns: &Netns, port: u16, query: &str) -> Option<f64> {
    let (status, body) = http_get(
        ns,
        port,
        &format!("/api/v1/query?query={}", urlencode(query)),
    )?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = json["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

/// Sum of `<metric>` samples whose label set contains every one of `parts`.
pub fn sample_sum(text: &str, metric: &str, parts: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && parts.iter().all(|p| l.contains(p)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The body of `/metrics` from 127.0.0.1:`port` inside `ns`.
pub fn metrics(ns: &Netns, port: u16) -> Option<String> {
    http_get(ns, port, "/metrics").map(|(_, body)| body)
}

/// Sum of `ntm_bytes_total` samples whose label set contains every one of
/// `parts`.
pub fn bytes_where(text: &str, parts: &[&str]) -> u64 {
    sample_sum(text, "ntm_bytes_total", parts)
}

/// Waits until the bytes to the sink (UDP port 5300) of each (label parts, bytes) equal
/// what was sent; returns the scrape.
pub fn wait_for_sink_bytes(link: &super::Link, port: u16, expect: &[(Vec<&str>, u64)]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics(&link.a, port).unwrap_or_default();
        let got: Vec<u64> = expect
            .iter()
            .map(|(parts, _)| {
                let mut parts = parts.clone();
                parts.push(r#"service="5300""#);
                bytes_where(&text, &parts)
            })
            .collect();
        let want: Vec<u64> = expect.iter().map(|(_, bytes)| *bytes).collect();
        if got == want {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "want {want:?}, got {got:?}:\n{text}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The value of a metric without labels.
pub fn plain_value(text: &str, metric: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{metric} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {metric} in:\n{text}"))
}

/// A Debian `prometheus` in `ns`, listening on 127.0.0.1:`port`, scraping
/// the agent on 127.0.0.1:`target` every second; stopped and its data
/// removed on drop.
pub struct Prometheus {
    _process: Guard,
    _dir: TempDir,
}

pub fn start_prometheus(ns: &Netns, port: u16, target: u16) -> Prometheus {
    start_prometheus_with(ns, port, target, "")
}

/// As [`start_prometheus`], with more of the scrape job's settings
/// (`scheme`, `tls_config`, `basic_auth`: YAML indented by four spaces).
pub fn start_prometheus_with(ns: &Netns, port: u16, target: u16, job: &str) -> Prometheus {
    start_prometheus_configured(
        ns,
        port,
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ntm\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n{job}"
        ),
    )
}

/// A Prometheus in `ns` on 127.0.0.1:`port` with `config` (prometheus.yml),
/// its data in a folder removed on drop.
pub fn start_prometheus_configured(ns: &Netns, port: u16, config: &str) -> Prometheus {
    let dir = TempDir::new(&format!("prom{port}"));
    let config_path = dir.0.join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let config = config_path;
    let process = Guard(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package) is installed by `cargo xtask test`"),
    );
    Prometheus {
        _process: process,
        _dir: dir,
    }
}

/// Waits until the agent in `ns` answers /healthz on 127.0.0.1:`port` with
/// 200 (every requested interface attached).
pub fn wait_healthy(ns: &Netns, port: u16) {
    wait_for("the agent's /healthz", Duration::from_secs(60), || {
        http_get(ns, port, "/healthz").filter(|(s, _)| *s == 200)
    });
}

/// Sends `count` datagrams of `payload` bytes from `link.b` to a socket on
/// `link.a`'s UDP `port`, then waits until the agent serving metrics on
/// `metrics_port` shows exactly their L3 bytes under service="`port`".
pub fn udp_counted_exactly(
    link: &super::Link,
    port: u16,
    count: usize,
    payload: usize,
    metrics_port: u16,
) {
    let _sink = link
        .a
        .run(|| std::net::UdpSocket::bind((super::A4, port)).unwrap());
    link.b.run(|| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..count {
            socket
                .send_to(&vec![0; payload], (super::A4, port))
                .unwrap();
        }
    });
    let service = format!("service=\"{port}\"");
    let want = (count * (payload + 28)) as u64;
    wait_for(
        "the datagrams in the counters",
        Duration::from_secs(20),
        || {
            let (_, text) = http_get(&link.a, metrics_port, "/metrics")?;
            (sample_sum(&text, "ntm_bytes_total", &[&service]) == want).then_some(())
        },
    );
}

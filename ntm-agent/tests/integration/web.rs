//! The endpoint secured by a web config file (exporter-toolkit format):
//! a real Prometheus scrapes over TLS with a client certificate and basic
//! auth; wrong passwords, missing or foreign certificates and plain HTTP
//! are refused; a changed password takes effect without a restart; a bad
//! file stops the agent before it attaches anything.

use std::{net::UdpSocket, path::Path, time::Duration};

use crate::kit::{
    A4, Agent, B4, Link, Netns,
    scrape::{TempDir, http_get, promql, wait_for},
    tls::{Client, TestPki, https_get},
};

const PORT: u16 = 9440;
const PROMETHEUS: u16 = 9441;

fn web_config(dir: &Path, password_hash: &str) {
    std::fs::write(
        dir.join("web.yml"),
        format!(
            "# as node_exporter takes it; paths are relative to this file\n\
             tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
             \x20 client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n\
             \x20 client_allowed_sans: [prometheus.test]\n  min_version: TLS12\n\
             http_server_config:\n  headers:\n    X-Frame-Options: deny\n\
             basic_auth_users:\n  prom: {password_hash}\n"
        ),
    )
    .unwrap();
}

fn get(
    ns: &Netns,
    pki: &TestPki,
    path: &str,
    password: Option<&str>,
) -> Result<(u16, String), String> {
    https_get(
        ns,
        PORT,
        path,
        &pki.ca,
        &Client {
            certificate: Some((&pki.client_cert, &pki.client_key)),
            basic_auth: password.map(|p| ("prom", p)),
        },
    )
}

pub fn prometheus_scrapes_over_tls_with_a_client_certificate_and_basic_auth() {
    let link = Link::new("tls");
    let dir = TempDir::new("tls");
    let pki = TestPki::new(&dir.0);
    web_config(&dir.0, &bcrypt::hash("s3cret", 4).unwrap());
    let _agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port(PORT)
        .args(["--drain-interval", "200ms", "--no-pin"])
        .arg("--web-config-file")
        .arg(dir.0.join("web.yml"))
        .spawn();
    // /healthz needs the client certificate (TLS is for every path) but no
    // password: probes can reach it.
    wait_for("/healthz over TLS", Duration::from_secs(20), || {
        get(&link.a, &pki, "/healthz", None)
            .ok()
            .filter(|(s, _)| *s == 200)
    });

    let ca = pki.ca.display();
    let (cert, key) = (pki.client_cert.display(), pki.client_key.display());
    let _prometheus = crate::kit::scrape::start_prometheus_with(
        &link.a,
        PROMETHEUS,
        PORT,
        &format!(
            "    scheme: https\n    tls_config:\n      ca_file: {ca}\n      cert_file: {cert}\n      key_file: {key}\n    basic_auth:\n      username: prom\n      password: s3cret\n"
        ),
    );
    let sink = link.a.run(|| UdpSocket::bind((A4, 5300)).unwrap());
    link.b.run(|| {
        let socket = UdpSocket::bind((B4, 0)).unwrap();
        for _ in 0..100 {
            socket.send_to(&[3; 100], (A4, 5300)).unwrap();
        }
    });
    link.wait_quiet();
    drop(sink);
    // Prometheus's own word on the target, should it not be up.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while promql(&link.a, PROMETHEUS, r#"up{job="ntm"}"#) != Some(1.0) {
        if std::time::Instant::now() > deadline {
            let targets = http_get(&link.a, PROMETHEUS, "/api/v1/targets");
            panic!("Prometheus cannot scrape ntm: {targets:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let query = r#"sum(ntm_bytes_total{src="198.18.0.2",proto="udp"})"#;
    wait_for(
        "Prometheus to scrape what was sent",
        Duration::from_secs(40),
        || promql(&link.a, PROMETHEUS, query).filter(|v| *v == (100 * 128) as f64),
    );
    assert_eq!(promql(&link.a, PROMETHEUS, r#"up{job="ntm"}"#), Some(1.0));

    // The right password, with the file's header.
    let (status, response) = get(&link.a, &pki, "/metrics", Some("s3cret")).unwrap();
    assert_eq!(status, 200);
    assert!(
        response
            .to_ascii_lowercase()
            .contains("x-frame-options: deny"),
        "{response}"
    );
    // A wrong password, none, the API or the page without one: 401, asking
    // for basic auth.
    for (path, password) in [
        ("/metrics", Some("wrong")),
        ("/metrics", None),
        ("/api/v1/devices", None),
        ("/", Some("S3CRET")),
        ("/page.js", None),
    ] {
        let (status, response) = get(&link.a, &pki, path, password).unwrap();
        assert_eq!(status, 401, "{path} {password:?}: {response}");
        assert!(response.contains("Basic realm="), "{response}");
        assert!(!response.contains("ntm_bytes_total"), "{response}");
    }
    // No client certificate, one from another CA, plain HTTP: no answer.
    let no_cert = https_get(&link.a, PORT, "/healthz", &pki.ca, &Client::default());
    assert!(no_cert.is_err(), "{no_cert:?}");
    let stranger = https_get(
        &link.a,
        PORT,
        "/healthz",
        &pki.ca,
        &Client {
            certificate: Some((&pki.stranger_cert, &pki.stranger_key)),
            basic_auth: None,
        },
    );
    assert!(stranger.is_err(), "{stranger:?}");
    let plain = http_get(&link.a, PORT, "/metrics");
    assert!(plain.as_ref().is_none_or(|(s, _)| *s != 200), "{plain:?}");

    // What was refused is counted, by reason.
    let (_, metrics) = get(&link.a, &pki, "/metrics", Some("s3cret")).unwrap();
    let refused = |reason: &str| {
        crate::kit::scrape::sample_sum(
            &metrics,
            "ntm_http_requests_refused_total",
            &[&format!(r#"reason="{reason}""#)],
        )
    };
    assert!(refused("unauthorized") >= 4, "{metrics}");
    assert!(refused("tls_handshake") >= 2, "{metrics}");

    // A new password takes effect without a restart; the old one stops.
    web_config(&dir.0, &bcrypt::hash("n3w", 4).unwrap());
    wait_for("the new password", Duration::from_secs(10), || {
        let new = get(&link.a, &pki, "/metrics", Some("n3w")).ok()?.0;
        let old = get(&link.a, &pki, "/metrics", Some("s3cret")).ok()?.0;
        (new == 200 && old == 401).then_some(())
    });
}

/// Each bad file: exit 1, one line naming the file and what is wrong,
/// nothing attached.
pub fn a_bad_web_config_fails_at_start_with_nothing_attached() {
    let link = Link::new("tlsbad");
    let dir = TempDir::new("tlsbad");
    let pki = TestPki::new(&dir.0);
    let hash = bcrypt::hash("x", 4).unwrap();
    let tls = |cert: &Path, key: &Path| {
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            cert.display(),
            key.display()
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("missing.yml", String::new(), "cannot read"),
        ("syntax.yml", "tls_server_config: [\n".into(), "not valid"),
        (
            "unknown.yml",
            "tls_config:\n  cert_file: a\n".into(),
            "not valid",
        ),
        (
            "plain.yml",
            "basic_auth_users:\n  prom: hunter2\n".into(),
            "not a bcrypt hash",
        ),
        (
            "nocert.yml",
            tls(&dir.0.join("none.crt"), &pki.server_key),
            "none.crt",
        ),
        (
            "mismatch.yml",
            tls(&pki.server_cert, &pki.client_key),
            "server.crt",
        ),
        (
            "anycert.yml",
            format!(
                "{}  client_auth_type: RequireAnyClientCert\n",
                tls(&pki.server_cert, &pki.server_key)
            ),
            "RequireAndVerifyClientCert",
        ),
        (
            "ok-but-tls10.yml",
            format!("basic_auth_users:\n  prom: {hash}\nrate_limit:\n  interval: often\n"),
            "rate_limit",
        ),
    ];
    for (name, text, want) in cases {
        let path = dir.0.join(name);
        if !text.is_empty() {
            std::fs::write(&path, &text).unwrap();
        }
        let out = Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .port_any_address(9442)
            .arg("--no-pin")
            .arg("--web-config-file")
            .arg(&path)
            .output();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{name} should fail: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("ntm-agent: "), "{name}: {err}");
        assert!(
            last.contains(name) && last.contains(want),
            "{name}: want {want:?} in {last}"
        );
        let attached = link
            .a
            .run(|| ntm_agent::kernel::attach::attached_ntm_programs(&link.a_if).unwrap());
        assert_eq!(attached, (vec![], vec![]), "{name} left programs attached");
    }
}

//! A test certificate authority (rcgen) and an HTTPS client (rustls) for
//! the endpoint's web config: a CA, a server certificate for 127.0.0.1 and
//! client certificates signed by it, written as PEM files.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};

use super::Netns;

/// PEM files of a CA, a server certificate (SAN 127.0.0.1) and a client
/// certificate (SAN `prometheus.test`), in `dir`.
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate from another CA.
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

fn new_ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.pem())
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    san: &str,
    dir: &Path,
    name: &str,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec![san.to_string()]).unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

impl TestPki {
    pub fn new(dir: &Path) -> Self {
        let (issuer, ca_pem) = new_ca("ntm test CA");
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, ca_pem).unwrap();
        let (server_cert, server_key) = leaf(&issuer, "127.0.0.1", dir, "server");
        let (client_cert, client_key) = leaf(&issuer, "prometheus.test", dir, "client");
        let (stranger, _) = new_ca("another CA");
        let (stranger_cert, stranger_key) = leaf(&stranger, "prometheus.test", dir, "stranger");
        Self {
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
            stranger_cert,
            stranger_key,
        }
    }
}

/// How an HTTPS request introduces itself.
#[derive(Default)]
pub struct Client<'a> {
    /// (certificate, key) PEM files.
    pub certificate: Option<(&'a Path, &'a Path)>,
    /// (user, password) for basic auth.
    pub basic_auth: Option<(&'a str, &'a str)>,
}

/// GET `path` over TLS from 127.0.0.1:`port` inside `ns`, trusting `ca`:
/// (status, headers and body), or why the connection failed.
pub fn https_get(
    ns: &Netns,
    port: u16,
    path: &str,
    ca: &Path,
    client: &Client,
) -> Result<(u16, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client.certificate {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let auth = client.basic_auth.map(|(user, password)| {
        use base64::Engine as _;
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    });
    ns.run(|| {
        let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn =
            rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        write!(
            tls,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{}\r\n",
            auth.unwrap_or_default()
        )
        .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        match tls.read_to_end(&mut response) {
            Ok(_) => {}
            // HTTP/1.0: the server closes without close_notify sometimes.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
            Err(e) => return Err(e.to_string()),
        }
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {response:?}"))?;
        Ok((status, response))
    })
}

//! `--web-config-file`: the web configuration file of Prometheus's
//! exporter-toolkit (what node_exporter takes as `--web.config.file`), so
//! that the endpoint is secured the way Prometheus users already know:
//! `tls_server_config` (certificate and key, client certificates, TLS
//! versions, cipher suites, curves), `http_server_config.headers`,
//! `basic_auth_users` (bcrypt hashes) and `rate_limit`.
//!
//! Paths in the file are relative to the file's folder, as in the toolkit.
//! Unknown keys are an error, as in the toolkit. What rustls cannot do is
//! refused at start with what to use instead: TLS below 1.2 (raised to
//! 1.2 with a warning: a floor is not weakened by raising it), client
//! certificates that are asked for but not verified (`RequestClientCert`,
//! `RequireAnyClientCert`), the P-521 curve, SANs other than DNS names and
//! IP addresses. `http2` is accepted and has no effect: ntm serves HTTP/1.1.
//!
//! The file and the files it names are read again when they change
//! ([`WebConfigWatcher`]), so that renewed certificates and changed
//! passwords take effect without a restart, as in the toolkit; a change
//! that does not load is logged and the last good configuration stays.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::BuildHasher as _,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    ServerConfig,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("cannot read the web config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the web config file {path} is not valid: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("the web config file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The file as written (exporter-toolkit's keys).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    tls_server_config: Option<TlsFileConfig>,
    http_server_config: Option<HttpFileConfig>,
    #[serde(default)]
    basic_auth_users: Option<BTreeMap<String, String>>,
    rate_limit: Option<RateLimitFileConfig>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TlsFileConfig {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    client_allowed_sans: Option<Vec<String>>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<Vec<String>>,
    prefer_server_cipher_suites: Option<bool>,
    curve_preferences: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HttpFileConfig {
    /// Accepted, as the toolkit's files may set it; ntm serves HTTP/1.1.
    #[allow(dead_code)]
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RateLimitFileConfig {
    interval: Option<String>,
    burst: Option<u32>,
}

/// A client certificate's subject alternative name that may connect.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AllowedSan {
    Dns(String),
    Ip(IpAddr),
}

/// TLS as the file asks for it.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<ServerConfig>,
    allowed_sans: Vec<AllowedSan>,
}

impl Tls {
    /// Whether the client's certificate (the first of `peer`, already
    /// verified by rustls) has one of the allowed SANs; true when no SAN
    /// list is set.
    pub fn client_allowed(&self, peer: Option<&[CertificateDer<'_>]>) -> bool {
        if self.allowed_sans.is_empty() {
            return true;
        }
        let Some(cert) = peer.and_then(|certs| certs.first()) else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
            return false;
        };
        let dns: Vec<String> = cert
            .valid_dns_names()
            .map(|name| name.to_ascii_lowercase())
            .collect();
        self.allowed_sans.iter().any(|allowed| match allowed {
            AllowedSan::Dns(name) => dns.iter().any(|d| d == name),
            AllowedSan::Ip(ip) => cert
                .verify_is_valid_for_subject_name(&rustls::pki_types::ServerName::IpAddress(
                    (*ip).into(),
                ))
                .is_ok(),
        })
    }
}

/// `basic_auth_users`: user names and bcrypt hashes.
pub struct BasicAuth {
    users: HashMap<String, String>,
    /// SHA-256 of (user, password, hash) of credentials that verified: bcrypt
    /// is slow on purpose (about 70 ms at cost 10), and a scrape every few
    /// seconds should not pay it each time (the toolkit caches them too).
    verified: Mutex<HashSet<[u8; 32]>>,
    /// A hash of a random password at the users' highest cost, compared
    /// against when the user is unknown, so that a wrong user name takes as
    /// long as a wrong password.
    no_user: String,
}

/// Verified credentials remembered at most.
const MAX_VERIFIED: usize = 64;

impl BasicAuth {
    /// The answer without bcrypt where there is one: Some(false) for no or
    /// a malformed header, Some(true) for credentials that verified
    /// before; None: ask [`BasicAuth::check`].
    pub fn quick(&self, authorization: Option<&str>) -> Option<bool> {
        let Some((user, password)) = authorization.and_then(decode_basic) else {
            return Some(false);
        };
        let hash = self.users.get(&user)?;
        let key = credentials_key(&user, &password, hash);
        self.verified
            .lock()
            .is_ok_and(|verified| verified.contains(&key))
            .then_some(true)
    }

    /// Whether `authorization` (the header's value) holds one of the
    /// users' passwords. Blocking: bcrypt takes tens of milliseconds.
    pub fn check(&self, authorization: Option<&str>) -> bool {
        let Some((user, password)) = authorization.and_then(decode_basic) else {
            return false;
        };
        let (hash, known) = match self.users.get(&user) {
            Some(hash) => (hash.as_str(), true),
            None => (self.no_user.as_str(), false),
        };
        let key = credentials_key(&user, &password, hash);
        if known
            && self
                .verified
                .lock()
                .is_ok_and(|verified| verified.contains(&key))
        {
            return true;
        }
        let ok = bcrypt::verify(password.as_bytes(), hash).unwrap_or(false) && known;
        if ok && let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(key);
        }
        ok
    }
}

fn credentials_key(user: &str, password: &str, hash: &str) -> [u8; 32] {
    let mut context = ::ring::digest::Context::new(&::ring::digest::SHA256);
    for part in [user, password, hash] {
        context.update(&(part.len() as u64).to_le_bytes());
        context.update(part.as_bytes());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(context.finish().as_ref());
    key
}

/// `Basic <base64(user:password)>` to (user, password).
fn decode_basic(header: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// `rate_limit`: a token bucket over all requests.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    fn new(interval: Duration, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            interval,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes a token if there is one.
    pub fn allow(&self, now: Instant) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return true;
        };
        let (tokens, at) = *state;
        let refilled = (tokens
            + now.saturating_duration_since(at).as_secs_f64() / self.interval.as_secs_f64())
        .min(self.burst);
        if refilled >= 1.0 {
            *state = (refilled - 1.0, now);
            true
        } else {
            *state = (refilled, now);
            false
        }
    }
}

/// A loaded web configuration.
pub struct WebConfig {
    pub tls: Option<Tls>,
    pub auth: Option<BasicAuth>,
    pub headers: Vec<(warp::http::HeaderName, warp::http::HeaderValue)>,
    pub rate_limit: Option<RateLimit>,
}

/// The headers the toolkit lets a file set, and the values it accepts
/// (None: any).
const HEADERS: &[(&str, Option<&[&str]>)] = &[
    ("Content-Security-Policy", None),
    ("X-Frame-Options", Some(&["deny", "sameorigin"])),
    ("X-Content-Type-Options", Some(&["nosniff"])),
    ("X-XSS-Protection", None),
    ("Strict-Transport-Security", None),
];

impl WebConfig {
    /// Reads and checks `path` and every file it names.
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: FileConfig = if text.trim().is_empty() {
            FileConfig::default()
        } else {
            serde_saphyr::from_str(&text).map_err(|e| WebConfigError::Syntax {
                path: path.to_path_buf(),
                reason: one_line(&e.to_string()),
            })?
        };
        let invalid = |reason: String| WebConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = file
            .tls_server_config
            .map(|tls| build_tls(tls, dir))
            .transpose()
            .map_err(invalid)?;
        let http = file.http_server_config.unwrap_or_default();
        let headers = build_headers(http.headers.unwrap_or_default()).map_err(invalid)?;
        let auth = file
            .basic_auth_users
            .filter(|users| !users.is_empty())
            .map(|users| {
                let mut cost = bcrypt::DEFAULT_COST;
                for (user, hash) in &users {
                    let parts = hash.parse::<bcrypt::HashParts>().map_err(|e| {
                        invalid(format!(
                            "basic_auth_users: the password of {user:?} is not a bcrypt hash ({e}); make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`"
                        ))
                    })?;
                    cost = cost.max(parts.get_cost());
                }
                let random = format!("{:x}", std::collections::hash_map::RandomState::new().hash_one(0u8));
                let no_user = bcrypt::hash(random, cost)
                    .map_err(|e| invalid(format!("basic_auth_users: {e}")))?;
                Ok(BasicAuth {
                    users: users.into_iter().collect(),
                    verified: Mutex::new(HashSet::new()),
                    no_user,
                })
            })
            .transpose()?;
        let rate_limit = match file.rate_limit {
            Some(limit) => {
                let interval = match limit.interval.as_deref() {
                    None | Some("0") | Some("0s") => Duration::ZERO,
                    Some(text) => crate::model::units::parse_duration(text)
                        .map_err(|e| invalid(format!("rate_limit.interval: {e}")))?,
                };
                (!interval.is_zero()).then(|| RateLimit::new(interval, limit.burst.unwrap_or(1)))
            }
            None => None,
        };
        Ok(Self {
            tls,
            auth,
            headers,
            rate_limit,
        })
    }

    /// What the log says at start.
    pub fn describe(&self) -> String {
        let mut parts = vec![if self.tls.is_some() { "TLS" } else { "no TLS" }];
        if self.auth.is_some() {
            parts.push("basic auth");
        }
        if self.rate_limit.is_some() {
            parts.push("a rate limit");
        }
        parts.join(", ")
    }
}

/// A parser's message on one line (it may draw the offending lines).
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .unwrap_or("unreadable YAML")
        .to_string()
}

fn build_headers(
    headers: BTreeMap<String, String>,
) -> Result<Vec<(warp::http::HeaderName, warp::http::HeaderValue)>, String> {
    let mut built = Vec::new();
    for (name, value) in headers {
        let Some((known, values)) = HEADERS.iter().find(|(h, _)| h.eq_ignore_ascii_case(&name))
        else {
            let known: Vec<&str> = HEADERS.iter().map(|(h, _)| *h).collect();
            return Err(format!(
                "http_server_config.headers: {name:?} cannot be set (these can: {})",
                known.join(", ")
            ));
        };
        if value.is_empty() {
            continue;
        }
        if let Some(values) = values
            && !values.iter().any(|v| v.eq_ignore_ascii_case(&value))
        {
            return Err(format!(
                "http_server_config.headers: {known} must be one of {}, not {value:?}",
                values.join(", ")
            ));
        }
        let value = warp::http::HeaderValue::from_str(&value).map_err(|_| {
            format!("http_server_config.headers: {known}: not a valid header value")
        })?;
        built.push((warp::http::HeaderName::from_static(lowercase(known)), value));
    }
    Ok(built)
}

fn lowercase(header: &str) -> &'static str {
    match header {
        "Content-Security-Policy" => "content-security-policy",
        "X-Frame-Options" => "x-frame-options",
        "X-Content-Type-Options" => "x-content-type-options",
        "X-XSS-Protection" => "x-xss-protection",
        _ => "strict-transport-security",
    }
}

/// PEM text given inline, or read from a file relative to `dir`.
fn pem(
    inline: Option<String>,
    file: Option<PathBuf>,
    key: &str,
    dir: &Path,
) -> Result<Option<(Vec<u8>, String)>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("give {key} or {key}_file, not both")),
        (Some(text), None) => Ok(Some((text.into_bytes(), format!("{key} (inline)")))),
        (None, Some(file)) => {
            let path = dir.join(&file);
            std::fs::read(&path)
                .map(|bytes| Some((bytes, path.display().to_string())))
                .map_err(|e| format!("{key}_file: cannot read {}: {e}", path.display()))
        }
        (None, None) => Ok(None),
    }
}

fn certificates(bytes: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in it"));
    }
    Ok(certs)
}

/// The TLS versions from `min_version` to `max_version`.
fn versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let rank = |name: &str, key: &str| match name {
        "TLS10" => Ok(10),
        "TLS11" => Ok(11),
        "TLS12" => Ok(12),
        "TLS13" => Ok(13),
        other => Err(format!(
            "{key}: {other:?} is not one of TLS10, TLS11, TLS12, TLS13"
        )),
    };
    let min = min.map_or(Ok(12), |m| rank(m, "min_version"))?;
    let max = max.map_or(Ok(13), |m| rank(m, "max_version"))?;
    if min < 12 {
        log::warn!(
            "web config: min_version TLS1{}: ntm (rustls) speaks TLS 1.2 and 1.3 only, so clients need TLS 1.2 at least",
            min - 10
        );
    }
    let all = [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)];
    let chosen: Vec<_> = all
        .into_iter()
        .filter(|(v, _)| (min.max(12)..=max).contains(v))
        .map(|(_, version)| version)
        .collect();
    if chosen.is_empty() {
        return Err(
            "min_version and max_version leave no TLS version ntm speaks (TLS12, TLS13)"
                .to_string(),
        );
    }
    Ok(chosen)
}

/// The ring provider, with the file's cipher suites (for TLS 1.2; TLS 1.3
/// suites are always on, as in Go) and curves, in the file's order.
fn provider(
    suites: Option<Vec<String>>,
    curves: Option<Vec<String>>,
) -> Result<CryptoProvider, String> {
    let mut provider = ring::default_provider();
    if let Some(names) = suites.filter(|s| !s.is_empty()) {
        let mut chosen: Vec<rustls::SupportedCipherSuite> = provider
            .cipher_suites
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS13)
            .copied()
            .collect();
        for name in names {
            // Go also knows the ChaCha20 suites without their hash's name.
            let iana = if name.ends_with("CHACHA20_POLY1305") {
                format!("{name}_SHA256")
            } else {
                name.clone()
            };
            let found = provider
                .cipher_suites
                .iter()
                .find(|s| format!("{:?}", s.suite()) == iana)
                .ok_or_else(|| {
                    let known: Vec<String> = provider
                        .cipher_suites
                        .iter()
                        .filter(|s| s.version() == &rustls::version::TLS12)
                        .map(|s| format!("{:?}", s.suite()))
                        .collect();
                    format!(
                        "cipher_suites: {name:?} is not one ntm offers (TLS 1.2: {})",
                        known.join(", ")
                    )
                })?;
            if !chosen.contains(found) {
                chosen.push(*found);
            }
        }
        provider.cipher_suites = chosen;
    }
    if let Some(names) = curves.filter(|c| !c.is_empty()) {
        let mut chosen = Vec::new();
        for name in names {
            let group = match name.as_str() {
                "X25519" => ring::kx_group::X25519,
                "CurveP256" => ring::kx_group::SECP256R1,
                "CurveP384" => ring::kx_group::SECP384R1,
                other => {
                    return Err(format!(
                        "curve_preferences: {other:?} is not one ntm offers (X25519, CurveP256, CurveP384)"
                    ));
                }
            };
            chosen.push(group);
        }
        provider.kx_groups = chosen;
    }
    Ok(provider)
}

fn build_tls(tls: TlsFileConfig, dir: &Path) -> Result<Tls, String> {
    let (cert, cert_from) = pem(tls.cert, tls.cert_file, "cert", dir)?
        .ok_or("tls_server_config needs cert_file (or cert) and key_file (or key)")?;
    let (key, key_from) = pem(tls.key, tls.key_file, "key", dir)?
        .ok_or("tls_server_config needs key_file (or key) with cert_file")?;
    let certs = certificates(&cert, &cert_from)?;
    let key = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|e| format!("{key_from}: not a PEM private key: {e}"))?;
    let provider = Arc::new(provider(tls.cipher_suites, tls.curve_preferences)?);
    let versions = versions(tls.min_version.as_deref(), tls.max_version.as_deref())?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let client_ca = pem(tls.client_ca, tls.client_ca_file, "client_ca", dir)?;
    let auth_type = tls.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let verify = |optional: bool| -> Result<_, String> {
        let (ca, ca_from) = client_ca
            .clone()
            .ok_or_else(|| format!("client_auth_type {auth_type} needs client_ca_file"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(&ca, &ca_from)? {
            roots
                .add(cert)
                .map_err(|e| format!("{ca_from}: not a CA certificate: {e}"))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
        let verifier = if optional {
            verifier.allow_unauthenticated()
        } else {
            verifier
        };
        verifier
            .build()
            .map_err(|e| format!("client_ca_file {ca_from}: {e}"))
    };
    let builder = match auth_type {
        "NoClientCert" => {
            if client_ca.is_some() {
                log::warn!(
                    "web config: client_ca_file is set but client_auth_type is NoClientCert: client certificates are not asked for"
                );
            }
            builder.with_no_client_auth()
        }
        "VerifyClientCertIfGiven" => builder.with_client_cert_verifier(verify(true)?),
        "RequireAndVerifyClientCert" => builder.with_client_cert_verifier(verify(false)?),
        "RequestClientCert" | "RequireAnyClientCert" => {
            return Err(format!(
                "client_auth_type {auth_type} accepts certificates nobody verified; ntm verifies them: use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file"
            ));
        }
        other => {
            return Err(format!(
                "client_auth_type {other:?} is not one of NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"
            ));
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("{cert_from} and {key_from}: {e}"))?;
    config.ignore_client_order = tls.prefer_server_cipher_suites.unwrap_or(true);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut allowed_sans = Vec::new();
    for san in tls.client_allowed_sans.unwrap_or_default() {
        if auth_type != "RequireAndVerifyClientCert" {
            return Err(
                "client_allowed_sans needs client_auth_type RequireAndVerifyClientCert (a client without a certificate has no SAN)"
                    .to_string(),
            );
        }
        allowed_sans.push(match san.parse::<IpAddr>() {
            Ok(ip) => AllowedSan::Ip(ip),
            Err(_) if rustls::pki_types::DnsName::try_from(san.as_str()).is_ok() => {
                AllowedSan::Dns(san.to_ascii_lowercase())
            }
            Err(_) => {
                return Err(format!(
                    "client_allowed_sans: {san:?}: ntm matches DNS names and IP addresses only"
                ));
            }
        });
    }
    Ok(Tls {
        config: Arc::new(config),
        allowed_sans,
    })
}

/// The files a configuration depends on, with their modification times,
/// to see when to read it again.
fn stamps(path: &Path) -> Vec<(PathBuf, Option<SystemTime>)> {
    let mut paths = vec![path.to_path_buf()];
    if let Ok(text) = std::fs::read_to_string(path)
        && let Ok(file) = serde_saphyr::from_str::<FileConfig>(&text)
        && let Some(tls) = file.tls_server_config
    {
        let dir = path.parent().unwrap_or(Path::new("."));
        for file in [tls.cert_file, tls.key_file, tls.client_ca_file]
            .into_iter()
            .flatten()
        {
            paths.push(dir.join(file));
        }
    }
    paths
        .into_iter()
        .map(|p| {
            let modified = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
            (p, modified)
        })
        .collect()
}

/// How often the files are looked at for changes, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// The current configuration, read again when its files change.
pub struct WebConfigWatcher {
    path: PathBuf,
    current: Arc<WebConfig>,
    stamps: Vec<(PathBuf, Option<SystemTime>)>,
    checked: Instant,
}

impl WebConfigWatcher {
    /// Loads `path` (an error here stops the agent before it attaches).
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let stamps = stamps(path);
        let current = Arc::new(WebConfig::load(path)?);
        Ok(Self {
            path: path.to_path_buf(),
            current,
            stamps,
            checked: Instant::now(),
        })
    }

    /// The configuration loaded last (without looking at the files).
    pub fn loaded(&self) -> &WebConfig {
        &self.current
    }

    /// The configuration to use now: read again if a file changed (and
    /// kept if the new one does not load, or turns TLS on or off, which
    /// needs a restart).
    pub fn current(&mut self, now: Instant) -> Arc<WebConfig> {
        if now.saturating_duration_since(self.checked) >= RECHECK {
            self.checked = now;
            let stamps = stamps(&self.path);
            if stamps != self.stamps {
                self.stamps = stamps;
                match WebConfig::load(&self.path) {
                    Ok(config) if config.tls.is_some() == self.current.tls.is_some() => {
                        log::info!(
                            "web config: read {} again ({})",
                            self.path.display(),
                            config.describe()
                        );
                        self.current = Arc::new(config);
                    }
                    Ok(_) => log::warn!(
                        "web config: {} now turns TLS {}; that takes a restart, keeping the configuration ntm started with",
                        self.path.display(),
                        if self.current.tls.is_some() {
                            "off"
                        } else {
                            "on"
                        }
                    ),
                    Err(e) => log::warn!("web config: keeping the last good configuration: {e}"),
                }
            }
        }
        Arc::clone(&self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<WebConfig, WebConfigError> {
        static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("ntm-webcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{n}.yml"));
        std::fs::write(&path, yaml).unwrap();
        let loaded = WebConfig::load(&path);
        let _ = std::fs::remove_file(&path);
        loaded
    }

    fn error(yaml: &str) -> String {
        match load(yaml) {
            Ok(_) => panic!("{yaml} loaded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn basic_auth_checks_bcrypt_hashes_and_caches_what_verified() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let config = load(&format!("basic_auth_users:\n  prom: {hash}\n")).unwrap();
        let auth = config.auth.unwrap();
        use base64::Engine as _;
        let header = |user: &str, password: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )
        };
        assert!(auth.check(Some(&header("prom", "secret"))));
        assert!(
            auth.check(Some(&header("prom", "secret"))),
            "from the cache"
        );
        assert!(!auth.check(Some(&header("prom", "wrong"))));
        assert!(!auth.check(Some(&header("nobody", "secret"))));
        assert!(!auth.check(Some("Bearer abc")));
        assert!(!auth.check(Some("Basic !!!")));
        assert!(!auth.check(None));
    }

    #[test]
    fn empty_and_auth_only_files_load() {
        let config = load("").unwrap();
        assert!(config.tls.is_none() && config.auth.is_none());
        let config = load("basic_auth_users: {}\n").unwrap();
        assert!(config.auth.is_none());
    }

    #[test]
    fn mistakes_are_clear_errors() {
        assert!(
            error("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n")
                .contains("cannot read")
        );
        assert!(error("basic_auth_users:\n  prom: plain\n").contains("not a bcrypt hash"));
        assert!(error("colour: red\n").contains("not valid"));
        assert!(error("tls_server_config: [").contains("not valid"));
        assert!(error("tls_server_config:\n  key_file: a.key\n").contains("needs cert_file"));
        assert!(
            error("http_server_config:\n  headers:\n    X-Frame-Options: allow\n").contains("deny")
        );
        assert!(
            error("http_server_config:\n  headers:\n    Server: ntm\n").contains("cannot be set")
        );
        assert!(error("rate_limit:\n  interval: soon\n").contains("rate_limit.interval"));
    }

    #[test]
    fn versions_and_suites() {
        assert_eq!(versions(None, None).unwrap().len(), 2);
        assert_eq!(
            versions(Some("TLS13"), None).unwrap(),
            vec![&rustls::version::TLS13]
        );
        assert_eq!(
            versions(Some("TLS10"), Some("TLS12")).unwrap(),
            vec![&rustls::version::TLS12]
        );
        assert!(versions(Some("TLS13"), Some("TLS12")).is_err());
        assert!(versions(Some("SSL3"), None).is_err());
        let p = provider(
            Some(vec!["TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305".into()]),
            None,
        )
        .unwrap();
        assert!(
            p.cipher_suites.iter().any(
                |s| format!("{:?}", s.suite()) == "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"
            )
        );
        assert!(provider(Some(vec!["TLS_RSA_WITH_RC4_128_SHA".into()]), None).is_err());
        assert!(provider(None, Some(vec!["CurveP521".into()])).is_err());
        assert_eq!(
            provider(None, Some(vec!["X25519".into()]))
                .unwrap()
                .kx_groups
                .len(),
            1
        );
    }

    #[test]
    fn the_rate_limit_is_a_token_bucket() {
        let limit = RateLimit::new(Duration::from_secs(1), 2);
        let t0 = Instant::now();
        assert!(limit.allow(t0));
        assert!(limit.allow(t0));
        assert!(!limit.allow(t0));
        assert!(limit.allow(t0 + Duration::from_secs(1)));
        assert!(!limit.allow(t0 + Duration::from_secs(1)));
    }

    proptest::proptest! {
        /// The Authorization header comes from any client: any bytes of it
        /// are refused or decoded, never a panic.
        #[test]
        fn any_authorization_header_is_safe(header in ".{0,80}", raw in proptest::collection::vec(proptest::num::u8::ANY, 0..60)) {
            let _ = decode_basic(&header);
            use base64::Engine as _;
            let encoded = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(&raw));
            let _ = decode_basic(&encoded);
        }
    }

    #[test]
    fn basic_headers_decode() {
        assert_eq!(
            decode_basic("Basic cHJvbTpzM2NyZXQ6eA=="),
            Some(("prom".into(), "s3cret:x".into()))
        );
        assert_eq!(decode_basic("basic"), None);
    }
}

//! `--web-config-file`: the web configuration file of Prometheus's
//! exporter-toolkit (what node_exporter takes as `--web.config.file`), read,
//! checked and read again when it changes, so that the endpoint is secured
//! the way Prometheus users already know: `tls_server_config` (built in
//! [`super::tls`]), `http_server_config.headers`, `basic_auth_users`
//! (bcrypt hashes, checked in [`super::auth`]) and `rate_limit` (applied in
//! [`super::guard`]).
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
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::Deserialize;

use super::{
    auth::{AuthError, BasicAuth},
    guard::RateLimit,
    tls::{Tls, TlsError, TlsFileConfig},
};

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("cannot read the web config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the web config file {} is not valid: {source}", path.display())]
    Syntax {
        path: PathBuf,
        #[source]
        source: YamlError,
    },
    #[error("the web config file {}: {source}", path.display())]
    Tls {
        path: PathBuf,
        #[source]
        source: Box<TlsError>,
    },
    #[error("the web config file {}: {source}", path.display())]
    Headers {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("the web config file {}: {source}", path.display())]
    Auth {
        path: PathBuf,
        #[source]
        source: AuthError,
    },
    #[error("the web config file {}: rate_limit.interval: {reason}", path.display())]
    RateLimit { path: PathBuf, reason: String },
}

/// What serde-saphyr found wrong in the file, on one line: its own
/// message may draw the offending lines under it, which the one line ntm
/// prints a failure as has no room for. The error itself is kept
/// ([`YamlError::get_ref`]); its cause, if any, is this one's.
#[derive(Debug)]
pub struct YamlError(Box<serde_saphyr::Error>);

impl YamlError {
    /// serde-saphyr's error, with all it says.
    pub fn get_ref(&self) -> &serde_saphyr::Error {
        &self.0
    }
}

impl std::fmt::Display for YamlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.0.to_string();
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| l.strip_prefix("error: ").unwrap_or(l))
            .unwrap_or("unreadable YAML");
        f.write_str(line)
    }
}

impl std::error::Error for YamlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // As serde-saphyr's snippet wrappers do: the cause of the message,
        // not the message again with its drawing.
        self.0.source()
    }
}

/// What in `http_server_config.headers` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("http_server_config.headers: {name:?} cannot be set (these can: {settable})")]
    NotSettable { name: String, settable: String },
    #[error("http_server_config.headers: {header} must be one of {allowed}, not {value:?}")]
    NotAllowed {
        header: &'static str,
        allowed: String,
        value: String,
    },
    /// `http`'s error says nothing more than this.
    #[error("http_server_config.headers: {header}: not a valid header value")]
    BadValue { header: &'static str },
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

/// A loaded web configuration.
pub struct WebConfig {
    pub tls: Option<Tls>,
    pub auth: Option<Arc<BasicAuth>>,
    pub headers: Vec<(warp::http::HeaderName, warp::http::HeaderValue)>,
    pub rate_limit: Option<Arc<RateLimit>>,
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
        let path_buf = || path.to_path_buf();
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path_buf(),
            source,
        })?;
        let file: FileConfig = if text.trim().is_empty() {
            FileConfig::default()
        } else {
            serde_saphyr::from_str(&text).map_err(|e| WebConfigError::Syntax {
                path: path_buf(),
                source: YamlError(Box::new(e)),
            })?
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = file
            .tls_server_config
            .map(|tls| Tls::build(tls, dir))
            .transpose()
            .map_err(|source| WebConfigError::Tls {
                path: path_buf(),
                source: Box::new(source),
            })?;
        let http = file.http_server_config.unwrap_or_default();
        let headers = build_headers(http.headers.unwrap_or_default()).map_err(|source| {
            WebConfigError::Headers {
                path: path_buf(),
                source,
            }
        })?;
        let auth = BasicAuth::new(file.basic_auth_users.unwrap_or_default())
            .map_err(|source| WebConfigError::Auth {
                path: path_buf(),
                source,
            })?
            .map(Arc::new);
        let rate_limit = match file.rate_limit {
            Some(limit) => {
                let interval = match limit.interval.as_deref() {
                    None | Some("0") | Some("0s") => Duration::ZERO,
                    Some(text) => crate::model::units::parse_duration(text).map_err(|reason| {
                        WebConfigError::RateLimit {
                            path: path_buf(),
                            reason,
                        }
                    })?,
                };
                (!interval.is_zero())
                    .then(|| Arc::new(RateLimit::new(interval, limit.burst.unwrap_or(1))))
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

fn build_headers(
    headers: BTreeMap<String, String>,
) -> Result<Vec<(warp::http::HeaderName, warp::http::HeaderValue)>, HeaderError> {
    let mut built = Vec::new();
    for (name, value) in headers {
        let Some((known, values)) = HEADERS.iter().find(|(h, _)| h.eq_ignore_ascii_case(&name))
        else {
            let settable: Vec<&str> = HEADERS.iter().map(|(h, _)| *h).collect();
            return Err(HeaderError::NotSettable {
                name,
                settable: settable.join(", "),
            });
        };
        if value.is_empty() {
            continue;
        }
        if let Some(values) = values
            && !values.iter().any(|v| v.eq_ignore_ascii_case(&value))
        {
            return Err(HeaderError::NotAllowed {
                header: known,
                allowed: values.join(", "),
                value,
            });
        }
        let value = warp::http::HeaderValue::from_str(&value)
            .map_err(|_| HeaderError::BadValue { header: known })?;
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
    fn empty_and_auth_only_files_load() {
        let config = load("").unwrap();
        assert!(config.tls.is_none() && config.auth.is_none());
        let config = load("basic_auth_users: {}\n").unwrap();
        assert!(config.auth.is_none());
        let hash = bcrypt::hash("secret", 4).unwrap();
        let config = load(&format!("basic_auth_users:\n  prom: {hash}\n")).unwrap();
        assert!(config.auth.is_some() && config.tls.is_none());
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
}

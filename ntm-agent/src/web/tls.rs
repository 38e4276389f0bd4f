//! `tls_server_config`: the rustls `ServerConfig` the web config's TLS
//! section asks for (rustls with ring): the server's certificate and key,
//! client certificates verified against `client_ca_file` (webpki), the
//! SANs a client certificate must carry, TLS versions, cipher suites and
//! curves; what rustls cannot do is refused with what to use instead.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ServerConfig,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;

/// What in `tls_server_config` cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("give {key} or {key}_file, not both")]
    InlineAndFile { key: &'static str },
    #[error("{key}_file: cannot read {}: {source}", path.display())]
    ReadFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tls_server_config needs cert_file (or cert) and key_file (or key)")]
    NoCertificate,
    #[error("tls_server_config needs key_file (or key) with cert_file")]
    NoKey,
    #[error("{from}: not PEM certificates: {source}")]
    NotCertificates {
        from: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{from}: no certificate in it")]
    EmptyCertificates { from: String },
    #[error("{from}: not a PEM private key: {source}")]
    NotKey {
        from: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{key}: {name:?} is not one of TLS10, TLS11, TLS12, TLS13")]
    UnknownVersion { key: &'static str, name: String },
    #[error("min_version and max_version leave no TLS version ntm speaks (TLS12, TLS13)")]
    NoVersion,
    #[error("TLS versions: {0}")]
    Versions(#[source] rustls::Error),
    #[error("cipher_suites: {name:?} is not one ntm offers (TLS 1.2: {offered})")]
    UnknownCipherSuite { name: String, offered: String },
    #[error("curve_preferences: {name:?} is not one ntm offers (X25519, CurveP256, CurveP384)")]
    UnknownCurve { name: String },
    #[error("client_auth_type {auth_type} needs client_ca_file")]
    NoClientCa { auth_type: String },
    #[error("{from}: not a CA certificate: {source}")]
    NotCa {
        from: String,
        #[source]
        source: rustls::Error,
    },
    #[error("client_ca_file {from}: {source}")]
    ClientVerifier {
        from: String,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error(
        "client_auth_type {auth_type} accepts certificates nobody verified; ntm verifies them: use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file"
    )]
    UnverifiedClients { auth_type: String },
    #[error(
        "client_auth_type {auth_type:?} is not one of NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"
    )]
    UnknownClientAuth { auth_type: String },
    #[error("{cert_from} and {key_from}: {source}")]
    CertificateAndKey {
        cert_from: String,
        key_from: String,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "client_allowed_sans needs client_auth_type RequireAndVerifyClientCert (a client without a certificate has no SAN)"
    )]
    SansWithoutVerification,
    #[error("client_allowed_sans: {san:?}: ntm matches DNS names and IP addresses only")]
    UnsupportedSan { san: String },
}

/// `tls_server_config` as written (exporter-toolkit's keys).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsFileConfig {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    pub(super) client_ca_file: Option<PathBuf>,
    client_allowed_sans: Option<Vec<String>>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<Vec<String>>,
    prefer_server_cipher_suites: Option<bool>,
    curve_preferences: Option<Vec<String>>,
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

    /// Builds the server's TLS from the file's section; files are relative
    /// to `dir`.
    pub(super) fn build(tls: TlsFileConfig, dir: &Path) -> Result<Self, TlsError> {
        let (cert, cert_from) =
            pem(tls.cert, tls.cert_file, "cert", dir)?.ok_or(TlsError::NoCertificate)?;
        let (key, key_from) = pem(tls.key, tls.key_file, "key", dir)?.ok_or(TlsError::NoKey)?;
        let certs = certificates(&cert, &cert_from)?;
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|source| TlsError::NotKey {
            from: key_from.clone(),
            source,
        })?;
        let provider = Arc::new(provider(tls.cipher_suites, tls.curve_preferences)?);
        let versions = versions(tls.min_version.as_deref(), tls.max_version.as_deref())?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&versions)
            .map_err(TlsError::Versions)?;
        let client_ca = pem(tls.client_ca, tls.client_ca_file, "client_ca", dir)?;
        let auth_type = tls.client_auth_type.as_deref().unwrap_or("NoClientCert");
        let verify = |optional: bool| -> Result<_, TlsError> {
            let (ca, ca_from) = client_ca.clone().ok_or_else(|| TlsError::NoClientCa {
                auth_type: auth_type.to_string(),
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(&ca, &ca_from)? {
                roots.add(cert).map_err(|source| TlsError::NotCa {
                    from: ca_from.clone(),
                    source,
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
            let verifier = if optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            verifier.build().map_err(|source| TlsError::ClientVerifier {
                from: ca_from,
                source,
            })
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
                return Err(TlsError::UnverifiedClients {
                    auth_type: auth_type.to_string(),
                });
            }
            other => {
                return Err(TlsError::UnknownClientAuth {
                    auth_type: other.to_string(),
                });
            }
        };
        let mut config =
            builder
                .with_single_cert(certs, key)
                .map_err(|source| TlsError::CertificateAndKey {
                    cert_from,
                    key_from,
                    source,
                })?;
        config.ignore_client_order = tls.prefer_server_cipher_suites.unwrap_or(true);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut allowed_sans = Vec::new();
        for san in tls.client_allowed_sans.unwrap_or_default() {
            if auth_type != "RequireAndVerifyClientCert" {
                return Err(TlsError::SansWithoutVerification);
            }
            allowed_sans.push(match san.parse::<IpAddr>() {
                Ok(ip) => AllowedSan::Ip(ip),
                Err(_) if rustls::pki_types::DnsName::try_from(san.as_str()).is_ok() => {
                    AllowedSan::Dns(san.to_ascii_lowercase())
                }
                Err(_) => return Err(TlsError::UnsupportedSan { san }),
            });
        }
        Ok(Self {
            config: Arc::new(config),
            allowed_sans,
        })
    }
}

/// PEM text given inline, or read from a file relative to `dir`, with
/// where it came from.
fn pem(
    inline: Option<String>,
    file: Option<PathBuf>,
    key: &'static str,
    dir: &Path,
) -> Result<Option<(Vec<u8>, String)>, TlsError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(TlsError::InlineAndFile { key }),
        (Some(text), None) => Ok(Some((text.into_bytes(), format!("{key} (inline)")))),
        (None, Some(file)) => {
            let path = dir.join(&file);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some((bytes, path.display().to_string()))),
                Err(source) => Err(TlsError::ReadFile { key, path, source }),
            }
        }
        (None, None) => Ok(None),
    }
}

fn certificates(bytes: &[u8], from: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::NotCertificates {
            from: from.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::EmptyCertificates {
            from: from.to_string(),
        });
    }
    Ok(certs)
}

/// The TLS versions from `min_version` to `max_version`.
fn versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, TlsError> {
    let rank = |name: &str, key: &'static str| match name {
        "TLS10" => Ok(10),
        "TLS11" => Ok(11),
        "TLS12" => Ok(12),
        "TLS13" => Ok(13),
        other => Err(TlsError::UnknownVersion {
            key,
            name: other.to_string(),
        }),
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
        return Err(TlsError::NoVersion);
    }
    Ok(chosen)
}

/// The ring provider, with the file's cipher suites (for TLS 1.2; TLS 1.3
/// suites are always on, as in Go) and curves, in the file's order.
fn provider(
    suites: Option<Vec<String>>,
    curves: Option<Vec<String>>,
) -> Result<CryptoProvider, TlsError> {
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
            let Some(found) = provider
                .cipher_suites
                .iter()
                .find(|s| format!("{:?}", s.suite()) == iana)
            else {
                let offered: Vec<String> = provider
                    .cipher_suites
                    .iter()
                    .filter(|s| s.version() == &rustls::version::TLS12)
                    .map(|s| format!("{:?}", s.suite()))
                    .collect();
                return Err(TlsError::UnknownCipherSuite {
                    name,
                    offered: offered.join(", "),
                });
            };
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
                _ => return Err(TlsError::UnknownCurve { name }),
            };
            chosen.push(group);
        }
        provider.kx_groups = chosen;
    }
    Ok(provider)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

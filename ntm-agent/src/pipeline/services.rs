//! Known service ports: /etc/services plus the user's additions.
//!
//! The kernel only needs to know *which* ports are services (to choose the
//! server-side port of a flow); the names are for labels. Both come from here.

use std::{collections::BTreeMap, fs, io, path::Path};

use ntm_common::{KNOWN_PORT_WORDS, service_port::PortClass};

pub const ETC_SERVICES: &str = "/etc/services";

#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error(
        "cannot read the services file {path}: {source}; fix --services-file (NTM_SERVICES_FILE) or leave it out to use /etc/services"
    )]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "bad service definition {spec:?}: expected PORT[/PROTO]=NAME, e.g. 8123/tcp=home-assistant (PROTO: tcp, udp or sctp; none means all three)"
    )]
    BadSpec { spec: String },
}

/// Service names by (protocol class, port). Later entries for the same port
/// and class do not replace earlier ones (as in getservbyport(3)); user
/// additions replace both.
#[derive(Clone, Debug, Default)]
pub struct ServiceRegistry {
    names: BTreeMap<(u32, u16), String>,
}

impl ServiceRegistry {
    /// Reads `/etc/services`-format text from `path`, which must be
    /// readable. Bytes that are not UTF-8 (in comments, say) are tolerated.
    pub fn from_file(path: &Path) -> Result<Self, ServicesError> {
        let bytes = fs::read(path).map_err(|source| ServicesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::parse(&String::from_utf8_lossy(&bytes)))
    }

    /// Reads [`ETC_SERVICES`]. Its absence is not an error (minimal
    /// containers have none): the registry is then simply empty.
    pub fn from_default_file() -> Result<Self, ServicesError> {
        let path = Path::new(ETC_SERVICES);
        match Self::from_file(path) {
            Err(ServicesError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                log::warn!(
                    "{ETC_SERVICES} not found: no port is known as a service unless given with --service"
                );
                Ok(Self::default())
            }
            other => other,
        }
    }

    /// Parses `/etc/services` format: `name port/proto [aliases...] [# comment]`.
    /// Malformed lines are skipped, as libc does.
    pub fn parse(text: &str) -> Self {
        let mut registry = Self::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut fields = line.split_whitespace();
            let (Some(name), Some(port_proto)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some((port, proto)) = port_proto.split_once('/') else {
                continue;
            };
            let (Ok(port), Some(class)) = (port.parse::<u16>(), class_of_name(proto)) else {
                continue;
            };
            registry
                .names
                .entry((class as u32, port))
                .or_insert_with(|| name.to_string());
        }
        registry
    }

    /// Adds a `--service` definition; it wins over the file.
    pub fn add(&mut self, spec: &ServiceSpec) {
        for class in &spec.classes {
            self.names
                .insert((*class as u32, spec.port), spec.name.clone());
        }
    }

    /// Adds `PORT[/PROTO]=NAME` (the `--service` flag); wins over the file.
    pub fn add_spec(&mut self, spec: &str) -> Result<(), ServicesError> {
        self.add(&spec.parse()?);
        Ok(())
    }

    pub fn name(&self, class: PortClass, port: u16) -> Option<&str> {
        self.names.get(&(class as u32, port)).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The bitmap the kernel program reads (see `ntm_common::service_port`).
    pub fn known_port_bitmap(&self) -> Vec<u32> {
        let mut words = vec![0u32; KNOWN_PORT_WORDS as usize];
        for &(class, port) in self.names.keys() {
            let class = match class {
                0 => PortClass::Tcp,
                1 => PortClass::Udp,
                _ => PortClass::Sctp,
            };
            let (word, mask) = ntm_common::service_port::known_port_bit(class, port);
            words[word as usize] |= mask;
        }
        words
    }
}

/// One `--service PORT[/PROTO]=NAME`: a name for a port, for one protocol
/// or (without PROTO) for TCP, UDP and SCTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub port: u16,
    pub classes: Vec<PortClass>,
    pub name: String,
}

impl std::str::FromStr for ServiceSpec {
    type Err = ServicesError;

    fn from_str(spec: &str) -> Result<Self, ServicesError> {
        let bad = || ServicesError::BadSpec {
            spec: spec.to_string(),
        };
        let (port_proto, name) = spec.split_once('=').ok_or_else(bad)?;
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(bad());
        }
        let (port, classes): (&str, Vec<PortClass>) = match port_proto.split_once('/') {
            Some((port, proto)) => (port, vec![class_of_name(proto).ok_or_else(bad)?]),
            None => (
                port_proto,
                vec![PortClass::Tcp, PortClass::Udp, PortClass::Sctp],
            ),
        };
        let port: u16 = port.trim().parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        Ok(Self {
            port,
            classes,
            name: name.to_string(),
        })
    }
}

fn class_of_name(proto: &str) -> Option<PortClass> {
    match proto.trim().to_ascii_lowercase().as_str() {
        "tcp" => Some(PortClass::Tcp),
        "udp" => Some(PortClass::Udp),
        "sctp" => Some(PortClass::Sctp),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_common::service_port::known_port_bit;

    const SAMPLE: &str = "\
# comment line
tcpmux\t\t1/tcp\t\t\t\t# TCP port service multiplexer
http\t\t80/tcp\t\twww\t\t# WorldWideWeb HTTP
https\t\t443/tcp
https\t\t443/udp\t\t\t\t# HTTP/3
http-alt\t8080/tcp\twebcache
x11\t\t6000/tcp\tx11-0
sctp-only\t2905/sctp
bogus line
badport\t\t99999/tcp
badproto\t7/xyz
domain\t\t53/udp
dns-dup\t\t53/udp
";

    #[test]
    fn parses_names_ports_and_protocols() {
        let r = ServiceRegistry::parse(SAMPLE);
        assert_eq!(r.name(PortClass::Tcp, 80), Some("http"));
        assert_eq!(r.name(PortClass::Tcp, 443), Some("https"));
        assert_eq!(r.name(PortClass::Udp, 443), Some("https"));
        assert_eq!(r.name(PortClass::Tcp, 8080), Some("http-alt"));
        assert_eq!(r.name(PortClass::Sctp, 2905), Some("sctp-only"));
        assert_eq!(r.name(PortClass::Udp, 80), None);
        // First definition wins, as getservbyport returns it.
        assert_eq!(r.name(PortClass::Udp, 53), Some("domain"));
        assert_eq!(r.len(), 8);
    }

    #[test]
    fn user_additions_win_and_validate() {
        let mut r = ServiceRegistry::parse(SAMPLE);
        r.add_spec("8123/tcp=home-assistant").unwrap();
        r.add_spec("443=my-https").unwrap();
        assert_eq!(r.name(PortClass::Tcp, 8123), Some("home-assistant"));
        assert_eq!(r.name(PortClass::Udp, 8123), None);
        assert_eq!(r.name(PortClass::Tcp, 443), Some("my-https"));
        assert_eq!(r.name(PortClass::Sctp, 443), Some("my-https"));
        for bad in [
            "",
            "80",
            "=x",
            "80/tcp=",
            "70000=x",
            "0=x",
            "80/icmp=x",
            "80=a b",
        ] {
            let err = r.add_spec(bad).unwrap_err().to_string();
            assert!(err.contains("PORT[/PROTO]=NAME"), "{bad}: {err}");
        }
    }

    #[test]
    fn bitmap_marks_exactly_the_known_ports() {
        let r = ServiceRegistry::parse(SAMPLE);
        let bits = r.known_port_bitmap();
        let is_set = |class, port| {
            let (w, m) = known_port_bit(class, port);
            bits[w as usize] & m != 0
        };
        assert!(is_set(PortClass::Tcp, 80));
        assert!(is_set(PortClass::Udp, 443));
        assert!(is_set(PortClass::Sctp, 2905));
        assert!(!is_set(PortClass::Udp, 80));
        assert!(!is_set(PortClass::Tcp, 81));
        let total: u32 = bits.iter().map(|w| w.count_ones()).sum();
        assert_eq!(total as usize, r.len());
    }

    #[test]
    fn a_named_file_must_exist_and_may_hold_bytes_that_are_not_utf8() {
        let err = ServiceRegistry::from_file(Path::new("/nonexistent/services"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/services"), "{err}");
        assert!(err.contains("--services-file"), "{err}");
        let dir = std::env::temp_dir().join(format!("ntm-services-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services");
        let mut text = b"# caf\xe9 in Latin-1\nhttp 80/tcp # \xff\xfe\n".to_vec();
        text.extend_from_slice(b"https 443/tcp\n");
        fs::write(&path, &text).unwrap();
        let r = ServiceRegistry::from_file(&path).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(r.name(PortClass::Tcp, 80), Some("http"));
        assert_eq!(r.name(PortClass::Tcp, 443), Some("https"));
    }
}

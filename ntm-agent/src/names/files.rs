//! Names from files the user points ntm at: `/etc/hosts`-style files
//! (`--hosts-file`) and `/etc/ethers`-style files (`--ethers-file`, names
//! by MAC address), the ladder's top rung; and DHCP servers' lease files
//! (`--leases`, in dnsmasq's format, which is also OpenWrt's
//! `/tmp/dhcp.leases`), which name both the address and the MAC.
//!
//! Each file is re-read when it changes (size or modification time). A file
//! that is missing, unreadable, too large or garbled keeps the names it gave
//! last, and the log says so once per change, not once per drain.
//!
//! Parsed here rather than by a crate: both formats are lines of
//! whitespace-separated fields (no crate reads dnsmasq's lease file), and
//! what matters is the bounds and the checks on names, which are ntm's.

use std::{
    collections::HashMap,
    fs,
    net::IpAddr,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use super::source::{Lookup, NameSource, Query, Source};
use crate::model::net::{Mac, parse_mac};
use crate::model::series::usable_name;

/// How a file's lines are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `ADDRESS NAME [ALIASES...]`, `#` comments.
    Hosts,
    /// `MAC NAME`, `#` comments (a line naming an address instead of a
    /// host is skipped).
    Ethers,
    /// A DHCP server's leases, in the format the text shows:
    /// - dnsmasq (and OpenWrt): `EXPIRY MAC ADDRESS HOSTNAME CLIENT-ID`
    ///   (IPv4), and after a `duid` line `EXPIRY IAID ADDRESS HOSTNAME
    ///   CLIENT-DUID` (IPv6); HOSTNAME `*` when the device sent none;
    ///   EXPIRY 0 for no end;
    /// - ISC dhcpd (`dhcpd.leases`): `lease ADDRESS { ... }` blocks with
    ///   `binding state`, `hardware ethernet` and `client-hostname`; the
    ///   last block for an address is the current one;
    /// - Kea's CSV (`kea-leases4.csv`, `kea-leases6.csv`): a header naming
    ///   the columns (`address`, `hwaddr`, `expire`, `hostname`, `state`);
    ///   the last line for an address is the current one.
    Leases,
}

/// Bytes ntm reads of one file at most; a larger one keeps its old names.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// Names one file gives at most; further lines are skipped (and counted).
pub const MAX_NAMES_PER_FILE: usize = 65_536;
/// What one file names.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ParsedFile {
    pub by_address: HashMap<IpAddr, String>,
    pub by_mac: HashMap<Mac, String>,
    /// Lines skipped: malformed, or beyond [`MAX_NAMES_PER_FILE`].
    pub skipped: usize,
}

/// The names in `text`. `now` decides which leases have ended.
pub fn parse(format: Format, text: &str, now: SystemTime) -> ParsedFile {
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if format == Format::Leases {
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'));
        if first.is_some_and(|l| l.starts_with("address,")) {
            return parse_kea(text, now);
        }
        if text
            .lines()
            .any(|l| l.trim_start().starts_with("lease ") && l.trim_end().ends_with('{'))
        {
            return parse_isc(text);
        }
    }
    let mut parsed = ParsedFile::default();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        // (address, MAC, name) of the line.
        let entry: Option<(Option<&str>, Option<&str>, &str)> = match format {
            Format::Hosts => match fields.as_slice() {
                [address, name, ..] => Some((Some(*address), None, *name)),
                _ => None,
            },
            Format::Ethers => match fields.as_slice() {
                [_, name] if name.parse::<IpAddr>().is_ok() => continue,
                [mac, name] => Some((None, Some(*mac), *name)),
                _ => None,
            },
            Format::Leases => match fields.as_slice() {
                ["duid", ..] => continue,
                [expiry, hardware, address, name, ..] => {
                    let ended = expiry.parse::<u64>().is_ok_and(|e| e != 0 && e < now);
                    if ended || *name == "*" {
                        continue;
                    }
                    // IPv6 leases carry an IAID where IPv4 ones have the MAC.
                    Some((Some(*address), Some(*hardware), *name))
                }
                _ => None,
            },
        };
        match entry {
            Some((address, mac, name)) => parsed.add(address, mac, name),
            None => parsed.skipped += 1,
        }
    }
    parsed
}

impl ParsedFile {
    /// Adds one entry, unless it is unusable or the file's bound is
    /// reached (then it counts as skipped). The first entry for an address
    /// or MAC wins, as in /etc/hosts.
    fn add(&mut self, address: Option<&str>, mac: Option<&str>, name: &str) {
        // A zone index (fe80::1%eth0) is not part of the address.
        let address = address.map(|a| a.split('%').next().unwrap_or(a).parse::<IpAddr>());
        let mac = mac.and_then(parse_mac);
        let usable = usable_name(name)
            && !matches!(address, Some(Err(_)))
            && (address.is_some() || mac.is_some());
        if !usable || self.by_address.len() + self.by_mac.len() >= MAX_NAMES_PER_FILE {
            self.skipped += 1;
            return;
        }
        let name = name.to_ascii_lowercase();
        if let Some(Ok(address)) = address {
            self.by_address
                .entry(address)
                .or_insert_with(|| name.clone());
        }
        if let Some(mac) = mac {
            self.by_mac.entry(mac).or_insert(name);
        }
    }
}

/// The current lease of each address in a log-like lease file (the last
/// record wins): (MAC, hostname), None where the lease is not active.
type CurrentLeases<'a> = HashMap<&'a str, Option<(Option<&'a str>, &'a str)>>;

fn from_current(current: CurrentLeases<'_>, skipped: usize) -> ParsedFile {
    let mut parsed = ParsedFile {
        skipped,
        ..ParsedFile::default()
    };
    for (address, lease) in current {
        if let Some((mac, name)) = lease {
            parsed.add(Some(address), mac, name);
        }
    }
    parsed
}

/// ISC dhcpd's `dhcpd.leases`.
fn parse_isc(text: &str) -> ParsedFile {
    let mut current: CurrentLeases = HashMap::new();
    let mut skipped = 0;
    // The block being read: address, MAC, hostname, active.
    let mut block: Option<(&str, Option<&str>, Option<&str>, bool)> = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let words: Vec<&str> = line.trim_end_matches(';').split_whitespace().collect();
        match (words.as_slice(), block.as_mut()) {
            (["lease", address, "{"], _) => block = Some((address, None, None, true)),
            (["}"], Some(_)) => {
                if let Some((address, mac, name, active)) = block.take() {
                    if current.len() >= MAX_NAMES_PER_FILE && !current.contains_key(address) {
                        skipped += 1;
                        continue;
                    }
                    current.insert(address, name.filter(|_| active).map(|n| (mac, n)));
                }
            }
            (["binding", "state", state], Some(b)) => b.3 = *state == "active",
            (["hardware", "ethernet", mac], Some(b)) => b.1 = Some(mac),
            (["client-hostname", name], Some(b)) => b.2 = Some(name.trim_matches('"')),
            _ => {}
        }
    }
    from_current(current, skipped)
}

/// Kea's memfile CSV (`kea-leases4.csv`, `kea-leases6.csv`).
fn parse_kea(text: &str, now: u64) -> ParsedFile {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (Some(address_at), Some(name_at)) = (column("address"), column("hostname")) else {
        return ParsedFile {
            skipped: 1,
            ..ParsedFile::default()
        };
    };
    let (mac_at, expire_at, state_at, lifetime_at) = (
        column("hwaddr"),
        column("expire"),
        column("state"),
        column("valid_lifetime"),
    );
    let mut current: CurrentLeases = HashMap::new();
    let mut skipped = 0;
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        let (Some(address), Some(name)) = (fields.get(address_at), fields.get(name_at)) else {
            skipped += 1;
            continue;
        };
        let field = |at: Option<usize>| at.and_then(|at| fields.get(at)).copied();
        let number = |at| field(at).and_then(|v| v.parse::<u64>().ok());
        // State 0 is a lease in use (1 declined, 2 reclaimed); a lifetime
        // of 0 is a released one.
        let active = field(state_at).is_none_or(|s| s == "0")
            && number(lifetime_at) != Some(0)
            && number(expire_at).is_none_or(|e| e == 0 || e >= now);
        // Kea writes names as FQDNs, and commas inside values as "&#x2c".
        let name = name.trim_end_matches('.');
        if current.len() >= MAX_NAMES_PER_FILE && !current.contains_key(address) {
            skipped += 1;
            continue;
        }
        let lease = (active && !name.is_empty() && !name.contains("&#x2c"))
            .then_some((field(mac_at), name));
        current.insert(address, lease);
    }
    from_current(current, skipped)
}

/// One file and what it said last.
struct NameFile {
    path: PathBuf,
    format: Format,
    /// (length, modification time) of the version read.
    read: Option<(u64, Option<SystemTime>)>,
    names: ParsedFile,
    /// What is wrong with it now, if anything (logged when it changes).
    problem: Option<String>,
}

impl NameFile {
    fn refresh(&mut self) {
        let metadata = match fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) => return self.trouble(format!("cannot read it ({e})")),
        };
        let version = (metadata.len(), metadata.modified().ok());
        if self.read == Some(version) && self.problem.is_none() {
            return;
        }
        if metadata.len() > MAX_FILE_BYTES {
            return self.trouble(format!(
                "it is {} bytes, more than the {MAX_FILE_BYTES} ntm reads",
                metadata.len()
            ));
        }
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) => return self.trouble(format!("cannot read it ({e})")),
        };
        let names = parse(
            self.format,
            &String::from_utf8_lossy(&bytes),
            SystemTime::now(),
        );
        self.read = Some(version);
        let (count, skipped) = (names.by_address.len() + names.by_mac.len(), names.skipped);
        if self.problem.take().is_some() || self.count() != count || skipped > 0 {
            log::info!(
                "{}: {count} names{}",
                self.path.display(),
                if skipped > 0 {
                    format!(" ({skipped} lines skipped: malformed, or beyond {MAX_NAMES_PER_FILE})")
                } else {
                    String::new()
                }
            );
        }
        self.names = names;
    }

    fn count(&self) -> usize {
        self.names.by_address.len() + self.names.by_mac.len()
    }

    fn trouble(&mut self, problem: String) {
        if self.problem.as_ref() != Some(&problem) {
            log::warn!(
                "{}: {problem}; keeping the {} names it gave before",
                self.path.display(),
                self.count()
            );
            self.problem = Some(problem);
        }
    }
}

/// The hosts files and lease files, in the ladder's order.
#[derive(Default)]
pub struct NameFiles {
    files: Vec<(NameFile, Source)>,
}

impl NameFiles {
    /// Reads every file once; one that cannot be read is logged, and tried
    /// again on every [`NameFiles::refresh`].
    pub fn open(hosts: &[PathBuf], ethers: &[PathBuf], leases: &[PathBuf]) -> Self {
        let file = |path: &PathBuf, format| NameFile {
            path: path.clone(),
            format,
            read: None,
            names: ParsedFile::default(),
            problem: None,
        };
        let mut files = Self {
            files: (hosts
                .iter()
                .map(|p| (file(p, Format::Hosts), Source::Static)))
            .chain(
                ethers
                    .iter()
                    .map(|p| (file(p, Format::Ethers), Source::Static)),
            )
            .chain(
                leases
                    .iter()
                    .map(|p| (file(p, Format::Leases), Source::Dhcp)),
            )
            .collect(),
        };
        files.refresh();
        files
    }

    /// Re-reads the files that changed.
    pub fn refresh(&mut self) {
        for (file, _) in &mut self.files {
            file.refresh();
        }
    }

    /// The name of `ip` (using the MAC address `mac` uses it from, when
    /// known), and its rung. The ladder: static names by address, then by
    /// MAC (a device keeps its name on every address it uses), then DHCP
    /// leases by address, then by MAC.
    pub fn name(&self, ip: IpAddr, mac: Option<Mac>) -> Option<(&str, Source)> {
        for rung in [Source::Static, Source::Dhcp] {
            let files = self.files.iter().filter(|(_, s)| *s == rung);
            for (file, _) in files.clone() {
                if let Some(name) = file.names.by_address.get(&ip) {
                    return Some((name, rung));
                }
            }
            if let Some(mac) = mac {
                for (file, _) in files {
                    if let Some(name) = file.names.by_mac.get(&mac) {
                        return Some((name, rung));
                    }
                }
            }
        }
        None
    }

    /// Whether any file names MAC addresses (then the neighbour table is
    /// worth reading).
    pub fn names_macs(&self) -> bool {
        self.files
            .iter()
            .any(|(file, _)| file.format != Format::Hosts)
    }
}

impl NameSource for NameFiles {
    fn name(&mut self, query: &Query) -> Lookup {
        match NameFiles::name(self, query.ip, query.mac) {
            Some((name, source)) => Lookup::Name(name.to_string(), source),
            None => Lookup::Next,
        }
    }

    fn refresh(&mut self) {
        NameFiles::refresh(self);
    }

    fn names_macs(&self) -> bool {
        NameFiles::names_macs(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn hosts_files_first_name_first_line_wins() {
        let text = "# static names\n127.0.0.1 localhost\n198.18.0.2\tPrinter printer.lan # office\n\
                    198.18.0.2 other\n2001:2::5 nas\nfe80::1%eth0 router\nnot-an-address x\n198.18.0.9\n";
        let ParsedFile {
            by_address: names,
            skipped,
            ..
        } = parse(Format::Hosts, text, at(0));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(names[&ip("198.18.0.2")], "printer");
        assert_eq!(names[&ip("2001:2::5")], "nas");
        assert_eq!(names[&ip("fe80::1")], "router");
        assert_eq!(names.len(), 4);
        assert_eq!(skipped, 2, "the bad address and the line without a name");
    }

    #[test]
    fn dnsmasq_leases_v4_and_v6_without_ended_or_nameless_ones() {
        let text = "1700000100 02:00:00:00:00:0a 198.18.0.100 phone-of-ana 01:02:00:00:00:00:00:0a\n\
                    0 02:00:00:00:00:0b 198.18.0.101 tv *\n\
                    1700000100 02:00:00:00:00:0c 198.18.0.102 * *\n\
                    1600000000 02:00:00:00:00:0d 198.18.0.103 gone *\n\
                    duid 00:01:00:01:2c:00:00:00:02:00:00:00:00:01\n\
                    1700000100 1234 2001:2::100 laptop 00:01:00:01\n\
                    garbage\n";
        let parsed = parse(Format::Leases, text, at(1_700_000_000));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let names = &parsed.by_address;
        assert_eq!(names[&ip("198.18.0.100")], "phone-of-ana");
        assert_eq!(names[&ip("198.18.0.101")], "tv", "expiry 0 never ends");
        assert_eq!(names[&ip("2001:2::100")], "laptop");
        assert_eq!(names.len(), 3);
        assert_eq!(parsed.by_mac[&[2, 0, 0, 0, 0, 0x0a]], "phone-of-ana");
        assert_eq!(parsed.by_mac.len(), 2, "the IAID is no MAC");
        assert_eq!(parsed.skipped, 1);
    }

    #[test]
    fn isc_dhcpd_leases_last_block_wins_and_only_active_ones_count() {
        let text = "# The format of this file is documented in the dhcpd.leases(5) manual page.\n\
            lease 198.18.0.100 {\n  starts 4 2026/12/03 10:00:00;\n  binding state active;\n\
              hardware ethernet 02:00:00:00:00:0a;\n  client-hostname \"phone-of-ana\";\n}\n\
            lease 198.18.0.101 {\n  binding state active;\n  client-hostname \"old-name\";\n}\n\
            lease 198.18.0.101 {\n  binding state active;\n  client-hostname \"new-name\";\n}\n\
            lease 198.18.0.102 {\n  binding state active;\n  client-hostname \"gone\";\n}\n\
            lease 198.18.0.102 {\n  binding state free;\n}\n\
            lease 198.18.0.103 {\n  binding state active;\n}\n";
        let parsed = parse(Format::Leases, text, at(0));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(parsed.by_address[&ip("198.18.0.100")], "phone-of-ana");
        assert_eq!(parsed.by_address[&ip("198.18.0.101")], "new-name");
        assert_eq!(parsed.by_address.len(), 2);
        assert_eq!(parsed.by_mac[&[2, 0, 0, 0, 0, 0x0a]], "phone-of-ana");
        // A block cut short by a write in progress is simply not there yet.
        let half = &text[..text.find("lease 198.18.0.101").unwrap() + 30];
        assert_eq!(parse(Format::Leases, half, at(0)).by_address.len(), 1);
    }

    #[test]
    fn kea_csv_leases_by_header_last_line_wins() {
        let text = "address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,hostname,state,user_context,pool_id\n\
            198.18.0.100,02:00:00:00:00:0a,01:02,3600,1700003600,1,0,0,phone-of-ana.home.arpa.,0,,0\n\
            198.18.0.101,02:00:00:00:00:0b,,3600,1700003600,1,0,0,tv,0,,0\n\
            198.18.0.101,02:00:00:00:00:0b,,0,1700000000,1,0,0,tv,0,,0\n\
            198.18.0.102,02:00:00:00:00:0c,,3600,1600000000,1,0,0,expired,0,,0\n\
            198.18.0.103,02:00:00:00:00:0d,,3600,1700003600,1,0,0,declined,1,,0\n\
            198.18.0.104,02:00:00:00:00:0e,,3600,1700003600,1,0,0,a&#x2cb,0,,0\n\
            short,line\n";
        let parsed = parse(Format::Leases, text, at(1_700_000_000));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            parsed.by_address[&ip("198.18.0.100")],
            "phone-of-ana.home.arpa"
        );
        assert_eq!(parsed.by_address.len(), 1, "{parsed:?}");
        let v6 = "address,duid,valid_lifetime,expire,subnet_id,pref_lifetime,lease_type,iaid,prefix_len,fqdn_fwd,fqdn_rev,hostname,hwaddr,state\n\
            2001:2::100,00:01:00:01,3600,1700003600,1,1800,0,1,128,0,0,laptop,02:00:00:00:00:0f,0\n";
        let parsed = parse(Format::Leases, v6, at(1_700_000_000));
        assert_eq!(parsed.by_address[&ip("2001:2::100")], "laptop");
        assert_eq!(parsed.by_mac[&[2, 0, 0, 0, 0, 0x0f]], "laptop");
    }

    #[test]
    fn ethers_files_name_macs_and_a_device_keeps_its_name_on_every_address() {
        let text = "02:00:00:00:00:02 phone
02-00-00-00-00-03	TV # living room
                    02:00:00:00:00:04 198.18.0.4
zz:00:00:00:00:05 bad
";
        let parsed = parse(Format::Ethers, text, at(0));
        assert_eq!(parsed.by_mac[&[2, 0, 0, 0, 0, 2]], "phone");
        assert_eq!(parsed.by_mac[&[2, 0, 0, 0, 0, 3]], "tv");
        assert_eq!(parsed.by_mac.len(), 2);
        assert_eq!(
            parsed.skipped, 1,
            "the bad MAC; the address line is no name"
        );
        assert_eq!(parse_mac("2:0:0:0:0:2"), Some([2, 0, 0, 0, 0, 2]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:02:03"), None);
        assert_eq!(parse_mac("002:00:00:00:00:02"), None);
    }

    #[test]
    fn names_are_bounded_and_checked() {
        assert!(usable_name("a-b.c_d"));
        assert!(!usable_name("<img src=x onerror=alert(1)>"), "whitespace");
        assert!(
            usable_name("\"quoted\"</script>"),
            "escaped by every output"
        );
        assert!(!usable_name(""));
        assert!(!usable_name(&"x".repeat(254)));
        assert!(!usable_name("bell\u{7}"));
        let many: String = (0..MAX_NAMES_PER_FILE + 10)
            .map(|i| format!("10.{}.{}.{} h{i}\n", i >> 16, (i >> 8) & 255, i & 255))
            .collect();
        let parsed = parse(Format::Hosts, &many, at(0));
        assert_eq!(parsed.by_address.len(), MAX_NAMES_PER_FILE);
        assert_eq!(parsed.skipped, 10);
        // Garbage of every length, never a panic.
        for len in 0..200 {
            let junk: String = (0..len)
                .map(|i| char::from(32 + (i * 7 % 90) as u8))
                .collect();
            for format in [Format::Hosts, Format::Ethers, Format::Leases] {
                let _ = parse(format, &junk, at(0));
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// Whatever the bytes (lease and hosts files can be written by any
        /// DHCP client's say-so): no panic, every name usable, the bound held.
        #[test]
        fn any_text_parses_within_bounds(
            text in proptest::string::string_regex("(?s).{0,600}").expect("regex"),
            lease_like in "([0-9]{1,10} [0-9a-f:]{0,17} [0-9.:a-f]{0,39} [ -~]{0,20} [ -~]{0,10}\n){0,8}",
            header in proptest::sample::select(vec!["", "address,hwaddr,expire,hostname,state\n", "lease 198.18.0.1 {\n"]),
        ) {
            for format in [Format::Hosts, Format::Ethers, Format::Leases] {
                for input in [text.clone(), format!("{header}{lease_like}"), format!("{header}{text}")] {
                    let parsed = parse(format, &input, at(1_700_000_000));
                    proptest::prop_assert!(parsed.by_address.len() + parsed.by_mac.len() <= MAX_NAMES_PER_FILE);
                    for name in parsed.by_address.values().chain(parsed.by_mac.values()) {
                        proptest::prop_assert!(usable_name(name), "{name:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_file_that_goes_bad_keeps_its_names_and_a_new_version_is_read() {
        let dir = std::env::temp_dir().join(format!("ntm-names-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        fs::write(&path, "198.18.0.2 printer\n").unwrap();
        let mut files = NameFiles::open(std::slice::from_ref(&path), &[], &[]);
        let ip: IpAddr = "198.18.0.2".parse().unwrap();
        assert_eq!(files.name(ip, None), Some(("printer", Source::Static)));
        fs::remove_file(&path).unwrap();
        files.refresh();
        assert_eq!(
            files.name(ip, None),
            Some(("printer", Source::Static)),
            "kept"
        );
        fs::write(&path, "198.18.0.2 scanner-and-printer\n").unwrap();
        files.refresh();
        assert_eq!(
            files.name(ip, None),
            Some(("scanner-and-printer", Source::Static))
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}

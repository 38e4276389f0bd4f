//! `<prefix>_host_info{address, mac, name, source}`: 1 for each host
//! (address and the name its series show) in the traffic series now.
//!
//! There are as many hosts as there may be series (100k on an edge
//! gateway), so, as the traffic series, they are kept compact (a row is an
//! address, a MAC, the shared label string and a static source name) and
//! written by ntm's own encoder ([`super::text`]). A `prometheus`
//! `IntGaugeVec` kept an object with owned label pairs per host, and each
//! scrape copied and sorted them all again: at 100k hosts, 75 MiB held and
//! four fifths of a scrape's time (see `docs/performance.md`).
//!
//! The rows are put in order when the hosts change (once per drain at
//! most), in the order the `prometheus` crate wrote them: by label values,
//! as text, in label-name order.

use std::{fmt, net::IpAddr};

use super::{sink::Host, text};
use crate::model::net::Mac;

const HELP: &str = "1 for each host (address and the name its series show) in the traffic series now, with its MAC where known and where the name came from; join on it (address or name) instead of adding labels to every series; at most --max-series hosts";

struct Row {
    address: IpAddr,
    mac: Option<Mac>,
    /// Where its name is in [`HostRows::names`] (start, length).
    name: (u32, u32),
    source: &'static str,
}

/// The rows of the hosts in labels, in the order they are written, and
/// their names end to end in that order: a scrape reads both straight
/// through (with a shared string per row, it waited on memory for most of
/// its time). Built and put in order by the drain, before it takes the
/// lock a scrape reads under.
#[derive(Default)]
pub struct HostRows {
    rows: Vec<Row>,
    names: String,
}

impl HostRows {
    /// At most `max` of `hosts` (which ones, past it, is arbitrary, as the
    /// hosts come in no order).
    pub fn new(hosts: &[Host], max: usize) -> Self {
        let mut hosts: Vec<&Host> = hosts.iter().take(max).collect();
        // By label values as text, in label-name order (address, mac, name,
        // source). Each address's text once, kept inline (not a `String`
        // per row: 100k of them were 10 MiB more at the drain's peak).
        hosts.sort_by_cached_key(|host| AddressText::of(host.ip));
        // An address under two names (two peers know it by two): by the
        // others. A MAC's text is fixed-width lower-case hex, so its order
        // is its bytes' ("" first).
        for same in hosts.chunk_by_mut(|a, b| a.ip == b.ip) {
            same.sort_by(|a, b| (a.mac, &a.label, a.source).cmp(&(b.mac, &b.label, b.source)));
        }
        let mut names = String::with_capacity(hosts.iter().map(|host| host.label.len()).sum());
        let rows = hosts
            .iter()
            .map(|host| {
                let start = names.len() as u32;
                names.push_str(&host.label);
                Row {
                    address: host.ip,
                    mac: host.mac,
                    name: (start, host.label.len() as u32),
                    source: host.source,
                }
            })
            .collect();
        Self { rows, names }
    }

    fn name(&self, row: &Row) -> &str {
        let (start, len) = row.name;
        &self.names[start as usize..(start + len) as usize]
    }
}

/// An address's text (at most 39 characters, IPv6's longest), compared
/// as text.
struct AddressText {
    bytes: [u8; 39],
    len: u8,
}

impl AddressText {
    fn of(ip: IpAddr) -> Self {
        let mut text = Self {
            bytes: [0; 39],
            len: 0,
        };
        text::address(ip, &mut text).expect("an address is at most 39 characters");
        text
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Write for AddressText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let start = usize::from(self.len);
        let end = start + s.len();
        self.bytes
            .get_mut(start..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end as u8;
        Ok(())
    }
}

impl PartialEq for AddressText {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for AddressText {}

impl PartialOrd for AddressText {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for AddressText {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

/// The hosts in labels, as `/metrics` shows them.
pub struct HostInfo {
    /// `<prefix>_host_info`.
    name: String,
    rows: HostRows,
}

impl HostInfo {
    pub fn new(prefix: &str) -> Self {
        Self {
            name: format!("{prefix}_host_info"),
            rows: HostRows::default(),
        }
    }

    /// The family's name: where it goes among the others.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The hosts now (the rows they were before are handed back, to be
    /// dropped outside the lock).
    pub fn set(&mut self, rows: HostRows) -> HostRows {
        std::mem::replace(&mut self.rows, rows)
    }

    pub fn len(&self) -> usize {
        self.rows.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.rows.is_empty()
    }

    /// Appends the family in the text format; nothing when there is no host
    /// (as the crate leaves out a family without series).
    pub fn encode(&self, out: &mut String) {
        if self.is_empty() {
            return;
        }
        text::family_header(out, &self.name, HELP, "gauge");
        for row in &self.rows.rows {
            out.push_str(&self.name);
            out.push_str("{address=\"");
            let _ = text::address(row.address, out);
            out.push_str("\",mac=\"");
            if let Some(mac) = row.mac {
                text::mac(mac, out);
            }
            out.push_str("\",name=\"");
            text::label_value(self.rows.name(row), out);
            out.push_str("\",source=\"");
            text::label_value(row.source, out);
            out.push_str("\"} 1\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn host(ip: &str, label: &str, mac: Option<Mac>) -> Host {
        Host {
            ip: ip.parse().unwrap(),
            label: Arc::from(label),
            source: "static",
            mac,
        }
    }

    /// The same text, in the same order, as the `prometheus` crate's
    /// `IntGaugeVec` it replaces wrote.
    #[test]
    fn written_as_the_prometheus_crate_wrote_it() {
        let hosts = [
            host("198.18.0.10", "ten", None),
            host("2001:2::1", "v6", Some([2, 0, 0, 0, 0, 0xab])),
            host("198.18.0.9", "evil\"\\\nname", None),
            host("198.18.0.9", "nine", Some([2, 0, 0, 0, 0, 9])),
            host("198.18.0.9", "also", Some([2, 0, 0, 0, 0, 9])),
            host("::1", "loopback", None),
            host("30.0.0.1", "thirty", None),
            host("::ffff:1.2.3.4", "mapped", None),
            host("2001:db8:0:0:1:0:0:1", "long", Some([0xff; 6])),
        ];
        let registry = prometheus::Registry::new();
        let gauge = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("ntm_host_info", HELP),
            &["address", "name", "mac", "source"],
        )
        .unwrap();
        registry.register(Box::new(gauge.clone())).unwrap();
        for h in &hosts {
            let mac = h.mac.map(crate::model::net::format_mac).unwrap_or_default();
            gauge
                .with_label_values(&[&h.ip.to_string(), &*h.label, &mac, h.source])
                .set(1);
        }
        let mut theirs = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut theirs)
            .unwrap();

        let mut info = HostInfo::new("ntm");
        info.set(HostRows::new(&hosts, usize::MAX));
        let mut ours = String::new();
        info.encode(&mut ours);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn at_most_max_hosts_and_nothing_when_empty() {
        let mut info = HostInfo::new("ntm");
        let mut out = String::new();
        info.encode(&mut out);
        assert_eq!(out, "");
        info.set(HostRows::new(
            &[host("10.0.0.1", "a", None), host("10.0.0.2", "b", None)],
            1,
        ));
        assert_eq!(info.len(), 1);
    }
}

//! The traffic series (`<prefix>_bytes_total`, `<prefix>_packets_total`):
//! compact storage and a direct text encoder.
//!
//! A home gateway has a few hundred series, an edge gateway can have a
//! hundred thousand. The general-purpose metric types keep a heavy object per
//! series and build an intermediate copy of everything on each scrape; here a
//! series is its interned label values and two counters, and a scrape writes
//! the exposition text straight from them.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

struct Series {
    bytes: u64,
    packets: u64,
    last_update: Instant,
}

pub struct TrafficSeries {
    prefix: String,
    /// Label names in the order values are given.
    names: Vec<&'static str>,
    /// Positions of `names` in alphabetical order, the order of exposition.
    sorted: Vec<usize>,
    interned: HashSet<Arc<str>>,
    series: HashMap<Box<[Arc<str>]>, Series>,
}

impl TrafficSeries {
    pub fn new(prefix: &str, names: Vec<&'static str>) -> Self {
        let mut sorted: Vec<usize> = (0..names.len()).collect();
        sorted.sort_by_key(|&i| names[i]);
        Self {
            prefix: prefix.to_string(),
            names,
            sorted,
            interned: HashSet::new(),
            series: HashMap::new(),
        }
    }

    fn intern(&mut self, value: &str) -> Arc<str> {
        if let Some(v) = self.interned.get(value) {
            return Arc::clone(v);
        }
        let v: Arc<str> = Arc::from(value);
        self.interned.insert(Arc::clone(&v));
        v
    }

    pub fn contains(&self, values: &[String]) -> bool {
        // Looking up by the interned form needs the interned values; a miss
        // on any value means the series cannot exist.
        let mut key = Vec::with_capacity(values.len());
        for v in values {
            match self.interned.get(v.as_str()) {
                Some(i) => key.push(Arc::clone(i)),
                None => return false,
            }
        }
        self.series.contains_key(key.as_slice())
    }

    /// Adds to the series with these label values (creating it).
    pub fn add(&mut self, values: &[String], bytes: u64, packets: u64, now: Instant) {
        let key: Box<[Arc<str>]> = values.iter().map(|v| self.intern(v)).collect();
        let s = self.series.entry(key).or_insert(Series {
            bytes: 0,
            packets: 0,
            last_update: now,
        });
        s.bytes = s.bytes.wrapping_add(bytes);
        s.packets = s.packets.wrapping_add(packets);
        s.last_update = now;
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Drops series not updated for `ttl`; returns how many.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> usize {
        let before = self.series.len();
        self.series
            .retain(|_, s| now.duration_since(s.last_update) <= ttl);
        let removed = before - self.series.len();
        if removed > 0 {
            // Values no series refers to any more (only the set holds them).
            self.interned.retain(|v| Arc::strong_count(v) > 1);
        }
        removed
    }

    /// Appends both counter families in the Prometheus text format.
    pub fn encode(&self, out: &mut String) {
        out.reserve(self.series.len() * 2 * 160);
        for (suffix, help, bytes) in [
            (
                "bytes_total",
                "L3 bytes (IPv4 total length, IPv6 payload + 40) counted in the kernel",
                true,
            ),
            ("packets_total", "Packets counted in the kernel", false),
        ] {
            let name = format!("{}_{suffix}", self.prefix);
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (values, s) in &self.series {
                out.push_str(&name);
                out.push('{');
                for (n, &i) in self.sorted.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    out.push_str(self.names[i]);
                    out.push_str("=\"");
                    escape_into(&values[i], out);
                    out.push('"');
                }
                out.push_str("} ");
                let _ = writeln!(out, "{}", if bytes { s.bytes } else { s.packets });
            }
        }
    }
}

/// Label value escaping of the text format: backslash, quote, newline.
/// Values can come from DNS answers, so this is not optional.
fn escape_into(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(values: &[&str]) -> Vec<String> {
        values.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn encodes_sorted_labels_and_both_families() {
        let mut t = TrafficSeries::new("ntm", vec!["src", "dst", "proto"]);
        let now = Instant::now();
        t.add(&v(&["a", "b", "tcp"]), 100, 2, now);
        t.add(&v(&["a", "b", "tcp"]), 50, 1, now);
        let mut out = String::new();
        t.encode(&mut out);
        assert!(out.contains("# TYPE ntm_bytes_total counter\n"), "{out}");
        assert!(
            out.contains(r#"ntm_bytes_total{dst="b",proto="tcp",src="a"} 150"#),
            "{out}"
        );
        assert!(
            out.contains(r#"ntm_packets_total{dst="b",proto="tcp",src="a"} 3"#),
            "{out}"
        );
    }

    #[test]
    fn hostile_label_values_are_escaped() {
        let mut t = TrafficSeries::new("ntm", vec!["src"]);
        t.add(&v(&["evil\"} 1\nfake_metric 2\\"]), 1, 1, Instant::now());
        let mut out = String::new();
        t.encode(&mut out);
        assert!(
            out.contains(r#"ntm_bytes_total{src="evil\"} 1\nfake_metric 2\\"} 1"#),
            "{out}"
        );
        assert!(!out.lines().any(|l| l.starts_with("fake_metric")), "{out}");
    }

    #[test]
    fn expiry_drops_series_and_unused_values() {
        let mut t = TrafficSeries::new("ntm", vec!["src"]);
        let t0 = Instant::now();
        t.add(&v(&["old"]), 1, 1, t0);
        t.add(&v(&["new"]), 1, 1, t0 + Duration::from_secs(50));
        assert_eq!(
            t.expire(t0 + Duration::from_secs(70), Duration::from_secs(60)),
            1
        );
        assert_eq!(t.len(), 1);
        assert!(!t.contains(&v(&["old"])));
        assert!(t.contains(&v(&["new"])));
        assert_eq!(t.interned.len(), 1);
    }
}

//! The traffic series (`<prefix>_bytes_total`, `<prefix>_packets_total`):
//! compact storage and a direct text encoder.
//!
//! A home gateway has a few hundred series, an edge gateway can have a
//! hundred thousand. The general-purpose metric types keep a heavy object per
//! series and build an intermediate copy of everything on each scrape; here a
//! series is the numbers of its label values and two counters, inline in
//! one table, the values themselves each once, end to end in one string
//! ([`Values`]), and a scrape writes the exposition text straight from them.
//!
//! Why so flat: a scrape reads every series. With a key allocated per
//! series (six shared strings behind a pointer each), it waited on memory
//! for most of its time at 100k series (a heap profile and `perf` of
//! `cargo xtask bench`, see `docs/performance.md`); the table is now read
//! in order and the values, a few hundred kilobytes, stay in cache.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    time::{Duration, Instant},
};

use hashbrown::HashTable;

use super::text;
use crate::model::series::Label;

/// Labels a series has at most: each label once.
const MAX_LABELS: usize = Label::ALL.len();

/// A series' label values, by number (see [`Values`]), in the order the
/// labels are given; the positions past the labels are 0.
type Key = [u32; MAX_LABELS];

struct Series {
    bytes: u64,
    packets: u64,
    last_update: Instant,
}

pub struct TrafficSeries {
    prefix: String,
    /// How many labels each series has.
    labels: usize,
    /// Positions of the label names (in the order values are given) in
    /// alphabetical order, the order of exposition.
    sorted: Vec<usize>,
    /// `name="` of each label, in exposition order: written as one piece.
    openers: Vec<String>,
    values: Values,
    series: HashMap<Key, Series>,
}

impl TrafficSeries {
    /// `names`: the label names, each once (at most the seven
    /// [`Label`]s).
    pub fn new(prefix: &str, names: Vec<&'static str>) -> Self {
        assert!(names.len() <= MAX_LABELS, "at most {MAX_LABELS} labels");
        let mut sorted: Vec<usize> = (0..names.len()).collect();
        sorted.sort_by_key(|&i| names[i]);
        let openers = sorted.iter().map(|&i| format!("{}=\"", names[i])).collect();
        Self {
            prefix: prefix.to_string(),
            labels: names.len(),
            sorted,
            openers,
            values: Values::default(),
            series: HashMap::new(),
        }
    }

    /// The key of the series with these label values, if every value is
    /// known (else no series has them).
    fn key_of(&self, values: &[impl AsRef<str>]) -> Option<Key> {
        debug_assert_eq!(values.len(), self.labels);
        let mut key = [0; MAX_LABELS];
        for (slot, value) in key.iter_mut().zip(values) {
            *slot = self.values.find(value.as_ref())?;
        }
        Some(key)
    }

    pub fn contains(&self, values: &[impl AsRef<str>]) -> bool {
        self.key_of(values)
            .is_some_and(|key| self.series.contains_key(&key))
    }

    /// Adds to the series with these label values (creating it).
    pub fn add(&mut self, values: &[impl AsRef<str>], bytes: u64, packets: u64, now: Instant) {
        let key = match self.key_of(values) {
            Some(key) if self.series.contains_key(&key) => key,
            // A new series: one more has each of its values.
            _ => {
                let mut key = [0; MAX_LABELS];
                for (slot, value) in key.iter_mut().zip(values) {
                    *slot = self.values.hold(value.as_ref());
                }
                key
            }
        };
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

    /// Drops series not updated for `ttl`, and the values only they had;
    /// returns how many series.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> usize {
        let before = self.series.len();
        let (labels, values) = (self.labels, &mut self.values);
        self.series.retain(|key, s| {
            let keep = now.duration_since(s.last_update) <= ttl;
            if !keep {
                for &number in &key[..labels] {
                    values.release(number);
                }
            }
            keep
        });
        self.values.compact();
        before - self.series.len()
    }

    /// Appends both counter families in the Prometheus text format.
    pub fn encode(&self, out: &mut String) {
        // The bytes family writes each series' labels; the packets family,
        // in the same order, copies them from there in one piece (where
        // they are kept, per series, in between).
        let mut labels = Vec::with_capacity(self.series.len());
        let bytes = format!("{}_bytes_total", self.prefix);
        text::family_header(
            out,
            &bytes,
            "L3 bytes (IPv4 total length, IPv6 payload + 40) counted in the kernel",
            "counter",
        );
        for (key, s) in &self.series {
            out.push_str(&bytes);
            let start = out.len();
            out.push('{');
            for (n, (&i, opener)) in self.sorted.iter().zip(&self.openers).enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push_str(opener);
                text::label_value(self.values.text(key[i]), out);
                out.push('"');
            }
            out.push_str("} ");
            labels.push(start..out.len());
            text::integer(s.bytes, out);
            out.push('\n');
        }
        let packets = format!("{}_packets_total", self.prefix);
        text::family_header(out, &packets, "Packets counted in the kernel", "counter");
        for (s, labels) in self.series.values().zip(labels) {
            out.push_str(&packets);
            out.extend_from_within(labels);
            text::integer(s.packets, out);
            out.push('\n');
        }
    }
}

/// The label values of the series, each once, end to end in one string,
/// by number; how many series use each, so that a value no series has any
/// more is let go (and its number used again).
#[derive(Default)]
struct Values {
    text: String,
    /// Where each number's value is in `text` (start, length); empty for a
    /// free number.
    spans: Vec<(u32, u32)>,
    /// Series that have each number's value.
    uses: Vec<u32>,
    /// Numbers no value has now.
    free: Vec<u32>,
    /// The numbers, found by their value's text.
    index: HashTable<u32>,
    /// Values come from the network (DNS answers): a keyed hash, as the
    /// standard library's maps use.
    hasher: std::hash::RandomState,
    /// Bytes of `text` no value uses any more.
    dead: usize,
}

impl Values {
    fn text(&self, number: u32) -> &str {
        let (start, len) = self.spans[number as usize];
        &self.text[start as usize..(start + len) as usize]
    }

    fn find(&self, value: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(value);
        self.index
            .find(hash, |&number| self.text(number) == value)
            .copied()
    }

    /// The number of `value`, which one series more has.
    fn hold(&mut self, value: &str) -> u32 {
        let number = match self.find(value) {
            Some(number) => number,
            None => self.insert(value),
        };
        self.uses[number as usize] += 1;
        number
    }

    fn insert(&mut self, value: &str) -> u32 {
        let span = (self.text.len() as u32, value.len() as u32);
        self.text.push_str(value);
        let number = match self.free.pop() {
            Some(number) => {
                self.spans[number as usize] = span;
                number
            }
            None => {
                self.spans.push(span);
                self.uses.push(0);
                (self.spans.len() - 1) as u32
            }
        };
        let hash = self.hasher.hash_one(value);
        let Self {
            index,
            hasher,
            text,
            spans,
            ..
        } = self;
        index.insert_unique(hash, number, |&n| {
            let (start, len) = spans[n as usize];
            hasher.hash_one(&text[start as usize..(start + len) as usize])
        });
        number
    }

    /// One series fewer has the value of `number`.
    fn release(&mut self, number: u32) {
        let uses = &mut self.uses[number as usize];
        *uses -= 1;
        if *uses > 0 {
            return;
        }
        let hash = self.hasher.hash_one(self.text(number));
        if let Ok(entry) = self.index.find_entry(hash, |&n| n == number) {
            entry.remove();
        }
        self.dead += self.spans[number as usize].1 as usize;
        self.spans[number as usize] = (0, 0);
        self.free.push(number);
    }

    /// Writes the values still in use end to end again, once most of the
    /// text is values let go.
    fn compact(&mut self) {
        if self.dead <= self.text.len() / 2 {
            return;
        }
        let mut text = String::with_capacity(self.text.len() - self.dead);
        for span in &mut self.spans {
            let (start, len) = *span;
            if len > 0 {
                *span = (text.len() as u32, len);
                text.push_str(&self.text[start as usize..(start + len) as usize]);
            }
        }
        self.text = text;
        self.dead = 0;
    }

    /// Values held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v<'a>(values: &[&'a str]) -> Vec<&'a str> {
        values.to_vec()
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
        assert_eq!(t.values.len(), 1);
    }

    /// Series come and go: the values of those that went are let go, their
    /// numbers used again, and the text kept at most about twice what is
    /// in use.
    #[test]
    fn values_are_shared_let_go_and_compacted() {
        let mut t = TrafficSeries::new("ntm", vec!["src", "proto"]);
        let t0 = Instant::now();
        for round in 0..10u64 {
            let now = t0 + Duration::from_secs(100 * round);
            for i in 0..100 {
                t.add(&[format!("host-{round}-{i}").as_str(), "tcp"], 1, 1, now);
            }
            t.expire(now, Duration::from_secs(60));
            assert_eq!(t.len(), 100);
            // 100 hosts and "tcp".
            assert_eq!(t.values.len(), 101);
            assert!(t.values.spans.len() <= 201, "{}", t.values.spans.len());
            assert!(t.values.text.len() <= 2 * (100 * 11 + 3) + 11);
        }
        let mut out = String::new();
        t.encode(&mut out);
        assert!(
            out.contains(r#"ntm_bytes_total{proto="tcp",src="host-9-99"} 1"#),
            "{out}"
        );
        assert!(!out.contains("host-8-"), "{out}");
    }
}

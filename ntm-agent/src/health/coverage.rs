//! The self-check: per monitored interface and hook, what ntm counted next
//! to what the kernel's own interface statistics (rtnetlink IFLA_STATS64)
//! say crossed it since ntm attached, and the share of it ntm saw over the
//! last minute.
//!
//! Frames are comparable, bytes not quite: the kernel counts link-layer
//! bytes, ntm L3 bytes. Where they differ for a reason, the metrics' help
//! says which: a GSO/GRO aggregate is one packet to some drivers' counters
//! and its segments to ntm; frames dropped before the ingress hook are in
//! the kernel's rx counters only; frames the qdisc drops after the egress
//! hook are in ntm's only.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use ntm_common::Hook;
use prometheus::{GaugeVec, IntCounterVec};

use crate::kernel::{Hooked, drain::Drained, links::LinkStats};

/// The window of the coverage figure.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Running totals of one interface label and hook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct HookTotals {
    counted: u64,
    kernel: u64,
}

pub struct Coverage {
    kernel_packets: IntCounterVec,
    kernel_bytes: IntCounterVec,
    counted_packets: IntCounterVec,
    ratio: GaugeVec,
    /// What the kernel's counters said at the last drain, per interface
    /// and hook (to add the difference).
    kernel_seen: HashMap<(u32, Hook), (u64, u64)>,
    /// Per label and hook: totals since start, and the samples of the
    /// last [`WINDOW`].
    totals: HashMap<(String, Hook), HookTotals>,
    samples: HashMap<(String, Hook), VecDeque<(Instant, HookTotals)>>,
}

impl Coverage {
    /// `(kernel packets, kernel bytes, counted packets)` counters and the
    /// ratio gauge, all labelled `iface` and `hook`.
    pub fn new(
        (kernel_packets, kernel_bytes, counted_packets, ratio): (
            IntCounterVec,
            IntCounterVec,
            IntCounterVec,
            GaugeVec,
        ),
    ) -> Self {
        Self {
            kernel_packets,
            kernel_bytes,
            counted_packets,
            ratio,
            kernel_seen: HashMap::new(),
            totals: HashMap::new(),
            samples: HashMap::new(),
        }
    }

    /// One drain, with the kernel's statistics read right after it.
    pub fn record(&mut self, drained: &Drained, hooked: &[Hooked], now: Instant) {
        let stats = &drained.link_stats;
        let mut counted: HashMap<(u32, Hook), u64> = HashMap::new();
        for (key, c) in &drained.flows {
            if let Some(hook) = Hook::from_u8(key.hook) {
                *counted.entry((key.ifindex, hook)).or_default() += c.packets;
            }
        }
        for (at, c) in drained.outside.iter() {
            *counted.entry((at.ifindex, at.hook)).or_default() += c.packets;
        }
        let mut labels_now = Vec::new();
        for hooked in hooked {
            let Some(now_stats) = stats.get(&hooked.ifindex) else {
                continue;
            };
            for &hook in hooked.hooks {
                let (packets, bytes) = kernel_side(now_stats, hook);
                let seen = self
                    .kernel_seen
                    .entry((hooked.ifindex, hook))
                    .or_insert_with(|| kernel_side(&hooked.since, hook));
                // A counter that went back (the interface was recreated
                // under the same index) starts again from zero.
                let new_packets = packets.checked_sub(seen.0).unwrap_or(packets);
                let new_bytes = bytes.checked_sub(seen.1).unwrap_or(bytes);
                *seen = (packets, bytes);
                let ours = counted.remove(&(hooked.ifindex, hook)).unwrap_or(0);
                let labels = [hooked.label.as_str(), hook.as_str()];
                self.kernel_packets
                    .with_label_values(&labels)
                    .inc_by(new_packets);
                self.kernel_bytes
                    .with_label_values(&labels)
                    .inc_by(new_bytes);
                self.counted_packets.with_label_values(&labels).inc_by(ours);
                let totals = self.totals.entry((hooked.label.clone(), hook)).or_default();
                totals.counted += ours;
                totals.kernel += new_packets;
                labels_now.push((hooked.label.clone(), hook));
            }
        }
        // Each label (several interfaces may share one) once.
        labels_now.sort();
        labels_now.dedup();
        for key in labels_now {
            let totals = self.totals[&key];
            let window = self.samples.entry(key.clone()).or_default();
            window.push_back((now, totals));
            while window
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > WINDOW)
            {
                window.pop_front();
            }
            let oldest = window.front().map(|(_, t)| *t).unwrap_or_default();
            let ratio = share(
                totals.counted - oldest.counted,
                totals.kernel - oldest.kernel,
            );
            let labels = [key.0.as_str(), key.1.as_str()];
            self.ratio.with_label_values(&labels).set(ratio);
        }
        // Interfaces no longer attached: their figures go.
        let kernel_seen = &mut self.kernel_seen;
        kernel_seen.retain(|(index, _), _| hooked.iter().any(|h| h.ifindex == *index));
        let live: Vec<(String, Hook)> = hooked
            .iter()
            .flat_map(|h| h.hooks.iter().map(|d| (h.label.clone(), *d)))
            .collect();
        let gone: Vec<(String, Hook)> = self
            .samples
            .keys()
            .filter(|k| !live.contains(k))
            .cloned()
            .collect();
        for key in gone {
            self.samples.remove(&key);
            self.totals.remove(&key);
            let _ = self
                .ratio
                .remove_label_values(&[key.0.as_str(), key.1.as_str()]);
        }
    }
}

/// The kernel's (packets, bytes) for the frames a hook sees.
fn kernel_side(stats: &LinkStats, hook: Hook) -> (u64, u64) {
    match hook {
        Hook::Ingress => (stats.rx_packets, stats.rx_bytes),
        Hook::Egress => (stats.tx_packets, stats.tx_bytes),
    }
}

/// ntm's share of what the kernel counted: 1 when both saw nothing (there
/// was nothing to miss); above 1 when ntm counted more (GSO segments, frames
/// a qdisc dropped after the egress hook).
fn share(counted: u64, kernel: u64) -> f64 {
    match (counted, kernel) {
        (0, 0) => 1.0,
        (_, 0) => counted as f64,
        _ => counted as f64 / kernel as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_common::{Counters, test_util::KeyBuilder};
    use prometheus::Opts;

    fn coverage() -> Coverage {
        let labels = &["iface", "hook"];
        let counter = |n: &str| IntCounterVec::new(Opts::new(n, n), labels).unwrap();
        Coverage::new((
            counter("k_packets"),
            counter("k_bytes"),
            counter("c_packets"),
            GaugeVec::new(Opts::new("ratio", "ratio"), labels).unwrap(),
        ))
    }

    fn stats(rx: u64, tx: u64) -> LinkStats {
        LinkStats {
            rx_packets: rx,
            rx_bytes: rx * 100,
            tx_packets: tx,
            tx_bytes: tx * 100,
        }
    }

    fn drained(ingress: u64, egress: u64, stats: LinkStats) -> Drained {
        let flow = |hook: Hook, packets| {
            (
                KeyBuilder::new().ifindex(2).hook(hook).build(),
                Counters {
                    bytes: packets * 86,
                    packets,
                },
            )
        };
        Drained {
            flows: vec![flow(Hook::Ingress, ingress), flow(Hook::Egress, egress)],
            link_stats: HashMap::from([(2, stats)]),
            ..Default::default()
        }
    }

    #[test]
    fn counts_since_attach_and_the_share_seen() {
        let mut c = coverage();
        let hooked = [Hooked {
            ifindex: 2,
            label: "eth0".into(),
            hooks: &[Hook::Ingress, Hook::Egress],
            since: stats(1000, 500),
        }];
        let start = Instant::now();
        // 100 in, 50 out, all seen.
        c.record(&drained(100, 50, stats(1100, 550)), &hooked, start);
        let labels = ["eth0", "ingress"];
        assert_eq!(c.kernel_packets.with_label_values(&labels).get(), 100);
        assert_eq!(c.kernel_bytes.with_label_values(&labels).get(), 10_000);
        assert_eq!(c.counted_packets.with_label_values(&labels).get(), 100);
        assert_eq!(c.ratio.with_label_values(&labels).get(), 1.0);
        // 100 more in, ntm saw 90.
        c.record(
            &drained(90, 0, stats(1200, 550)),
            &hooked,
            start + Duration::from_secs(1),
        );
        assert_eq!(c.kernel_packets.with_label_values(&labels).get(), 200);
        assert_eq!(c.counted_packets.with_label_values(&labels).get(), 190);
        assert_eq!(c.ratio.with_label_values(&labels).get(), 0.9);
        // A minute later only the last minute counts: all seen again.
        c.record(
            &drained(10, 0, stats(1210, 550)),
            &hooked,
            start + Duration::from_secs(62),
        );
        assert_eq!(c.ratio.with_label_values(&labels).get(), 1.0);
        assert_eq!(
            c.ratio.with_label_values(&["eth0", "egress"]).get(),
            1.0,
            "nothing crossed: nothing missed"
        );
        // Detached: the figures go.
        c.record(&Drained::default(), &[], start);
        assert!(c.samples.is_empty() && c.kernel_seen.is_empty());
    }

    #[test]
    fn share_of_nothing_is_whole() {
        assert_eq!(share(0, 0), 1.0);
        assert_eq!(share(5, 10), 0.5);
        assert_eq!(share(3, 0), 3.0);
    }
}

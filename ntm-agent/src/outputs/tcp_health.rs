//! How well TCP connections fare, as Prometheus families:
//! - `<prefix>_tcp_handshake_seconds{side, client, server, service}`: the
//!   handshakes the hooks saw, split where ntm sees them: `side="server"`
//!   (the client's SYN to the server's SYN-ACK: the server and the path to
//!   it) by server and service, `side="client"` (the SYN-ACK to the
//!   client's ACK: the device and its link) by client; the other labels
//!   empty, so that neither multiplies the other;
//! - `<prefix>_tcp_connections_failed_total{client, server, service,
//!   reason}`: `refused`, `unanswered`, `reset`, `unreachable`;
//! - `<prefix>_tcp_retransmits_total{client, server, service}`: segments
//!   this host's connections retransmitted (the kernel counts them by
//!   connection, `kernel/retransmits.rs`);
//! - `<prefix>_tcp_syn_retries_total{client, server, service}`: SYNs sent
//!   again (their handshakes' server side is not measured);
//! - `<prefix>_tcp_handshakes_untracked_total{reason}`: handshakes not
//!   followed (`table_full`, `synack_unmatched`, `busy`, `ack_unseen`).
//!
//! The pipeline names clients and servers as the traffic series name them.
//! Each family is bounded on its own and never adds to the traffic series'
//! count: a label set exists only once something happened to it, at most
//! `max_series` series per family (a histogram's label set is
//! [`SERIES_PER_HISTOGRAM`] series); beyond it, what comes goes to the
//! label set whose values are all `other`. A label set idle for the series
//! TTL is dropped, as traffic series are.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::sink::{LabelledDrain, Sink};
use crate::kernel::{drain::Drained, handshakes::Outcome};

/// The label value of the series that takes what has no room.
const OTHER: &str = "other";

/// Handshake times from a LAN's fraction of a millisecond to a satellite
/// link's second and the SYN retries' 1 s, in seconds.
const HANDSHAKE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Series one label set of the histogram takes: its buckets, `+Inf`,
/// `_sum` and `_count`.
pub const SERIES_PER_HISTOGRAM: usize = HANDSHAKE_BUCKETS.len() + 3;

/// The label sets of one family, each with when it last changed, at most
/// `max` of them.
struct LabelSets<const N: usize> {
    seen: HashMap<[Arc<str>; N], Instant>,
    max: usize,
}

impl<const N: usize> LabelSets<N> {
    fn new(max: usize) -> Self {
        Self {
            seen: HashMap::new(),
            max: max.max(1),
        }
    }

    /// The label set to count under: `labels`, or, when the family is
    /// full, `other` in every label but those at `keep` (the histogram's
    /// side, a failure's reason) and the empty ones.
    fn admit(&mut self, labels: [Arc<str>; N], keep: &[usize], now: Instant) -> [Arc<str>; N] {
        let labels = if self.seen.contains_key(&labels) || self.seen.len() < self.max {
            labels
        } else {
            let other: Arc<str> = Arc::from(OTHER);
            std::array::from_fn(|i| {
                if keep.contains(&i) || labels[i].is_empty() {
                    Arc::clone(&labels[i])
                } else {
                    Arc::clone(&other)
                }
            })
        };
        self.seen.insert(labels.clone(), now);
        labels
    }

    /// Drops the label sets idle for `ttl`, each through `remove`.
    fn expire(&mut self, now: Instant, ttl: Duration, mut remove: impl FnMut(&[&str])) {
        self.seen.retain(|labels, last| {
            let keep = now.duration_since(*last) < ttl;
            if !keep {
                let values: [&str; N] = std::array::from_fn(|i| &*labels[i]);
                remove(&values);
            }
            keep
        });
    }
}

fn values<const N: usize>(labels: &[Arc<str>; N]) -> [&str; N] {
    std::array::from_fn(|i| &*labels[i])
}

pub struct TcpHealthSink {
    handshake_seconds: HistogramVec,
    handshakes: LabelSets<4>,
    failed: IntCounterVec,
    failures: LabelSets<4>,
    retransmits: IntCounterVec,
    retransmitting: LabelSets<3>,
    syn_retries: IntCounterVec,
    retrying: LabelSets<3>,
    untracked: IntCounterVec,
}

impl TcpHealthSink {
    pub fn new(
        registry: &Registry,
        prefix: &str,
        max_series: usize,
    ) -> Result<Self, prometheus::Error> {
        let handshake_seconds = HistogramVec::new(
            HistogramOpts::new(
                format!("{prefix}_tcp_handshake_seconds"),
                "TCP handshakes seen on the monitored interfaces, split where ntm sees them: side=\"server\" from the client's SYN to the server's SYN-ACK (by server and service), side=\"client\" from the SYN-ACK to the client's ACK (by client); retried handshakes are not measured",
            )
            .buckets(HANDSHAKE_BUCKETS.to_vec()),
            &["side", "client", "server", "service"],
        )?;
        let failed = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_tcp_connections_failed_total"),
                "TCP connections seen on the monitored interfaces that failed, by client, server, service and reason: refused (a RST answered the SYN), unanswered (no SYN-ACK within 10 s), reset (a RST during the handshake or once up), unreachable (an ICMP destination unreachable answered the SYN)",
            ),
            &["client", "server", "service", "reason"],
        )?;
        let retransmits = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_tcp_retransmits_total"),
                "TCP segments this host's connections retransmitted (containers and pods included; forwarded traffic is not seen), by client, server and service",
            ),
            &["client", "server", "service"],
        )?;
        let syn_retries = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_tcp_syn_retries_total"),
                "SYNs TCP clients sent again, seen on the monitored interfaces (their handshakes' server side is not measured), by client, server and service",
            ),
            &["client", "server", "service"],
        )?;
        let untracked = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_tcp_handshakes_untracked_total"),
                "TCP handshakes ntm did not follow, by reason: table_full (the kernel's table of handshakes in flight was full), synack_unmatched (a SYN-ACK whose SYN was not seen), busy (a SYN on ports whose last handshake was not yet taken), ack_unseen (the client's ACK was not seen)",
            ),
            &["reason"],
        )?;
        for family in [&failed, &retransmits, &syn_retries, &untracked] {
            registry.register(Box::new(family.clone()))?;
        }
        registry.register(Box::new(handshake_seconds.clone()))?;
        let max_series = max_series.max(1);
        Ok(Self {
            handshake_seconds,
            handshakes: LabelSets::new(max_series / SERIES_PER_HISTOGRAM),
            failed,
            failures: LabelSets::new(max_series),
            retransmits,
            retransmitting: LabelSets::new(max_series),
            syn_retries,
            retrying: LabelSets::new(max_series),
            untracked,
        })
    }
}

impl Sink for TcpHealthSink {
    fn raw(&mut self, drained: &Drained, _ifaces: &HashMap<u32, String>, _now: Instant) {
        let h = &drained.handshakes;
        for (reason, n) in [
            ("table_full", h.no_room),
            ("synack_unmatched", h.synack_unmatched),
            ("busy", h.busy),
            ("ack_unseen", h.ack_unseen),
        ] {
            if n != 0 {
                self.untracked.with_label_values(&[reason]).inc_by(n);
            }
        }
    }

    fn labelled(&mut self, drain: &LabelledDrain, now: Instant) {
        let empty: Arc<str> = Arc::from("");
        for h in &drain.handshakes {
            match h.outcome {
                Outcome::Established { server, client } => {
                    let sides = [
                        (
                            server,
                            [
                                Arc::from("server"),
                                Arc::clone(&empty),
                                Arc::clone(&h.server),
                                Arc::clone(&h.service),
                            ],
                        ),
                        (
                            client,
                            [
                                Arc::from("client"),
                                Arc::clone(&h.client),
                                Arc::clone(&empty),
                                Arc::clone(&empty),
                            ],
                        ),
                    ];
                    for (time, labels) in sides {
                        let Some(time) = time else { continue };
                        let labels = self.handshakes.admit(labels, &[0], now);
                        self.handshake_seconds
                            .with_label_values(&values(&labels))
                            .observe(time.as_secs_f64());
                    }
                }
                outcome => {
                    let Some(reason) = outcome.failure() else {
                        continue;
                    };
                    let labels = [
                        Arc::clone(&h.client),
                        Arc::clone(&h.server),
                        Arc::clone(&h.service),
                        Arc::from(reason),
                    ];
                    let labels = self.failures.admit(labels, &[3], now);
                    self.failed.with_label_values(&values(&labels)).inc();
                }
            }
        }
        for (counts, family, sets) in [
            (
                &drain.retransmits,
                &self.retransmits,
                &mut self.retransmitting,
            ),
            (&drain.syn_retries, &self.syn_retries, &mut self.retrying),
        ] {
            for r in counts {
                let labels = [
                    Arc::clone(&r.client),
                    Arc::clone(&r.server),
                    Arc::clone(&r.service),
                ];
                let labels = sets.admit(labels, &[], now);
                family.with_label_values(&values(&labels)).inc_by(r.count);
            }
        }
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        let (seconds, failed, retransmits, syn_retries) = (
            &self.handshake_seconds,
            &self.failed,
            &self.retransmits,
            &self.syn_retries,
        );
        self.handshakes.expire(now, ttl, |v| {
            let _ = seconds.remove_label_values(v);
        });
        self.failures.expire(now, ttl, |v| {
            let _ = failed.remove_label_values(v);
        });
        self.retransmitting.expire(now, ttl, |v| {
            let _ = retransmits.remove_label_values(v);
        });
        self.retrying.expire(now, ttl, |v| {
            let _ = syn_retries.remove_label_values(v);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::sink::{LabelledConnectionCount, LabelledHandshake};

    fn drain(items: &[(&str, &str, &str, u64)]) -> LabelledDrain {
        LabelledDrain {
            retransmits: items
                .iter()
                .map(|(client, server, service, count)| LabelledConnectionCount {
                    client: Arc::from(*client),
                    server: Arc::from(*server),
                    service: Arc::from(*service),
                    count: *count,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn text(registry: &Registry) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap()
    }

    #[test]
    fn retransmits_add_up_per_series_bounded_and_expire() {
        let registry = Registry::new();
        let mut sink = TcpHealthSink::new(&registry, "ntm", 2).unwrap();
        let t0 = Instant::now();
        sink.labelled(
            &drain(&[
                ("laptop", "example.com", "https", 3),
                ("laptop", "nas", "smb", 1),
            ]),
            t0,
        );
        sink.labelled(
            &drain(&[
                ("laptop", "example.com", "https", 2),
                ("tv", "cdn", "https", 5),
            ]),
            t0 + Duration::from_secs(30),
        );
        let body = text(&registry);
        assert!(body.contains(
            "ntm_tcp_retransmits_total{client=\"laptop\",server=\"example.com\",service=\"https\"} 5"
        ));
        assert!(body.contains(
            "ntm_tcp_retransmits_total{client=\"laptop\",server=\"nas\",service=\"smb\"} 1"
        ));
        assert!(body.contains(
            "ntm_tcp_retransmits_total{client=\"other\",server=\"other\",service=\"other\"} 5"
        ));
        // The smb series was idle for 60 s, the others for 30 s.
        sink.expire(t0 + Duration::from_secs(60), Duration::from_secs(45));
        let body = text(&registry);
        assert!(!body.contains("smb"), "{body}");
        assert!(body.contains("example.com"), "{body}");
    }

    fn handshakes(items: &[(&str, &str, &str, Outcome)]) -> LabelledDrain {
        LabelledDrain {
            handshakes: items
                .iter()
                .map(|(client, server, service, outcome)| LabelledHandshake {
                    client: Arc::from(*client),
                    server: Arc::from(*server),
                    service: Arc::from(*service),
                    outcome: *outcome,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn up(server_ms: u64, client_ms: Option<u64>) -> Outcome {
        Outcome::Established {
            server: Some(Duration::from_millis(server_ms)),
            client: client_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn handshake_sides_are_labelled_by_server_and_by_client() {
        let registry = Registry::new();
        let mut sink = TcpHealthSink::new(&registry, "ntm", 1000).unwrap();
        sink.labelled(
            &handshakes(&[
                ("laptop", "example.com", "https", up(100, Some(40))),
                ("tv", "example.com", "https", up(30, None)),
                ("laptop", "nas", "smb", Outcome::Refused),
                ("laptop", "nas", "smb", Outcome::Refused),
                ("tv", "cdn", "https", Outcome::Unanswered),
                ("tv", "cdn", "https", Outcome::Reset),
            ]),
            Instant::now(),
        );
        let body = text(&registry);
        for line in [
            r#"ntm_tcp_handshake_seconds_count{client="",server="example.com",service="https",side="server"} 2"#,
            r#"ntm_tcp_handshake_seconds_sum{client="",server="example.com",service="https",side="server"} 0.13"#,
            r#"ntm_tcp_handshake_seconds_bucket{client="",server="example.com",service="https",side="server",le="0.05"} 1"#,
            r#"ntm_tcp_handshake_seconds_count{client="laptop",server="",service="",side="client"} 1"#,
            r#"ntm_tcp_connections_failed_total{client="laptop",reason="refused",server="nas",service="smb"} 2"#,
            r#"ntm_tcp_connections_failed_total{client="tv",reason="unanswered",server="cdn",service="https"} 1"#,
            r#"ntm_tcp_connections_failed_total{client="tv",reason="reset",server="cdn",service="https"} 1"#,
        ] {
            assert!(body.contains(line), "no {line} in\n{body}");
        }
        assert!(
            !body.contains(r#"client="tv",server="",service="",side="client""#),
            "{body}"
        );
    }

    #[test]
    fn handshake_families_are_bounded_keeping_side_and_reason() {
        let registry = Registry::new();
        // Room for two histogram label sets, and 2 * 15 failure series.
        let mut sink = TcpHealthSink::new(&registry, "ntm", 2 * SERIES_PER_HISTOGRAM).unwrap();
        let mut items = Vec::new();
        for i in 0..40 {
            let server = format!("s{i}");
            let server: &'static str = Box::leak(server.into_boxed_str());
            items.push(("laptop", server, "https", up(10, None)));
            items.push(("laptop", server, "https", Outcome::Refused));
        }
        sink.labelled(&handshakes(&items), Instant::now());
        let body = text(&registry);
        assert!(body.contains(
            r#"ntm_tcp_handshake_seconds_count{client="",server="other",service="other",side="server"} 38"#
        ), "{body}");
        assert!(body.contains(
            r#"ntm_tcp_connections_failed_total{client="other",reason="refused",server="other",service="other"} 10"#
        ), "{body}");
        let histogram_sets = body
            .lines()
            .filter(|l| l.starts_with("ntm_tcp_handshake_seconds_count"))
            .count();
        assert_eq!(histogram_sets, 3, "{body}");
    }

    #[test]
    fn syn_retries_add_up_by_client_server_and_service() {
        let registry = Registry::new();
        let mut sink = TcpHealthSink::new(&registry, "ntm", 10).unwrap();
        let retried = |n| LabelledConnectionCount {
            client: Arc::from("laptop"),
            server: Arc::from("slow.example"),
            service: Arc::from("https"),
            count: n,
        };
        sink.labelled(
            &LabelledDrain {
                syn_retries: vec![retried(2), retried(3)],
                ..Default::default()
            },
            Instant::now(),
        );
        assert!(text(&registry).contains(
            r#"ntm_tcp_syn_retries_total{client="laptop",server="slow.example",service="https"} 5"#
        ));
    }

    #[test]
    fn untracked_handshakes_are_counted_by_reason() {
        let registry = Registry::new();
        let mut sink = TcpHealthSink::new(&registry, "ntm", 10).unwrap();
        let mut drained = Drained::default();
        drained.handshakes.no_room = 7;
        drained.handshakes.ack_unseen = 1;
        sink.raw(&drained, &HashMap::new(), Instant::now());
        let body = text(&registry);
        assert!(
            body.contains(r#"ntm_tcp_handshakes_untracked_total{reason="table_full"} 7"#),
            "{body}"
        );
        assert!(
            body.contains(r#"ntm_tcp_handshakes_untracked_total{reason="ack_unseen"} 1"#),
            "{body}"
        );
        assert!(!body.contains(r#"reason="busy""#), "{body}");
    }

    #[test]
    fn names_are_escaped_in_the_exposition() {
        let registry = Registry::new();
        let mut sink = TcpHealthSink::new(&registry, "ntm", 10).unwrap();
        sink.labelled(&drain(&[("a\"b\\c\nd", "s", "x", 1)]), Instant::now());
        assert!(text(&registry).contains(r#"client="a\"b\\c\nd""#));
    }
}

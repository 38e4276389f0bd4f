//! How well TCP connections fare, as Prometheus counters: for now the
//! segments this host's connections retransmitted,
//! `<prefix>_tcp_retransmits_total{client, server, service}` (the kernel
//! counts them by connection, `kernel/retransmits.rs`; the pipeline names
//! the client and the server as the traffic series name them).
//!
//! Bounded on its own: a series exists only for a (client, server,
//! service) that retransmitted, at most `max_series` of them (the traffic
//! series' bound); beyond it, retransmits go to the series whose labels are
//! all `other`. A series idle for the series TTL is dropped, as traffic
//! series are. The family never adds to the traffic series' count.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus::{IntCounterVec, Opts, Registry};

use super::sink::{LabelledDrain, Sink};

/// The label value of the series that takes what has no room.
const OTHER: &str = "other";

pub struct TcpHealthSink {
    retransmits: IntCounterVec,
    /// Each series and when it last grew.
    series: HashMap<[Arc<str>; 3], Instant>,
    max_series: usize,
}

impl TcpHealthSink {
    pub fn new(
        registry: &Registry,
        prefix: &str,
        max_series: usize,
    ) -> Result<Self, prometheus::Error> {
        let retransmits = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_tcp_retransmits_total"),
                "TCP segments this host's connections retransmitted (containers and pods included; forwarded traffic is not seen), by client, server and service",
            ),
            &["client", "server", "service"],
        )?;
        registry.register(Box::new(retransmits.clone()))?;
        Ok(Self {
            retransmits,
            series: HashMap::new(),
            max_series: max_series.max(1),
        })
    }
}

impl Sink for TcpHealthSink {
    fn labelled(&mut self, drain: &LabelledDrain, now: Instant) {
        for r in &drain.retransmits {
            let mut labels = [
                Arc::clone(&r.client),
                Arc::clone(&r.server),
                Arc::clone(&r.service),
            ];
            if !self.series.contains_key(&labels) && self.series.len() >= self.max_series {
                let other: Arc<str> = Arc::from(OTHER);
                labels = [Arc::clone(&other), Arc::clone(&other), other];
            }
            let values = [&*labels[0], &*labels[1], &*labels[2]];
            self.retransmits
                .with_label_values(&values)
                .inc_by(r.segments);
            self.series.insert(labels, now);
        }
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        let retransmits = &self.retransmits;
        self.series.retain(|labels, last| {
            let keep = now.duration_since(*last) < ttl;
            if !keep {
                let _ = retransmits.remove_label_values(&[&*labels[0], &*labels[1], &*labels[2]]);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::sink::LabelledRetransmits;

    fn drain(items: &[(&str, &str, &str, u64)]) -> LabelledDrain {
        LabelledDrain {
            retransmits: items
                .iter()
                .map(|(client, server, service, segments)| LabelledRetransmits {
                    client: Arc::from(*client),
                    server: Arc::from(*server),
                    service: Arc::from(*service),
                    segments: *segments,
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

    #[test]
    fn names_are_escaped_in_the_exposition() {
        let registry = Registry::new();
        let mut sink = TcpHealthSink::new(&registry, "ntm", 10).unwrap();
        sink.labelled(&drain(&[("a\"b\\c\nd", "s", "x", 1)]), Instant::now());
        assert!(text(&registry).contains(r#"client="a\"b\\c\nd""#));
    }
}

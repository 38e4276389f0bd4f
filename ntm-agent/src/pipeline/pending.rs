//! Flows waiting for their hosts' names: a new flow's deltas are held (a
//! bounded time, `--name-wait`) until both its hosts have a label, so that a
//! name arriving a moment later does not split its counter into an address
//! series and a name series.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use ntm_common::{Counters, FlowKey};

/// Flows waiting at most; beyond it they are decided at once (addresses
/// where no name is known).
pub const MAX_WAITING_FLOWS: usize = 100_000;

#[derive(Default)]
pub struct PendingFlows {
    /// Deltas not yet exported, with when the flow was first seen.
    waiting: HashMap<FlowKey, (Counters, Instant)>,
}

impl PendingFlows {
    /// Adds one drain's deltas.
    pub fn add(&mut self, flows: &[(FlowKey, Counters)], now: Instant) {
        for (key, delta) in flows {
            self.waiting
                .entry(*key)
                .and_modify(|(c, _)| c.add(delta))
                .or_insert((*delta, now));
        }
    }

    /// Hands every flow whose hosts `decide` can label now to `export`,
    /// and keeps the others waiting. `decide` gets the key and when the flow
    /// was first seen, and answers None to wait longer. Past
    /// [`MAX_WAITING_FLOWS`], every flow is treated as having waited
    /// `wait` already.
    pub fn release<L>(
        &mut self,
        now: Instant,
        wait: Duration,
        mut decide: impl FnMut(&FlowKey, Instant) -> Option<L>,
        mut export: impl FnMut(&FlowKey, L, &Counters),
    ) {
        let overfull = self.waiting.len() > MAX_WAITING_FLOWS;
        self.waiting.retain(|key, (delta, first_seen)| {
            let seen = if overfull {
                now.checked_sub(wait).unwrap_or(*first_seen)
            } else {
                *first_seen
            };
            match decide(key, seen) {
                Some(labels) => {
                    export(key, labels, delta);
                    false
                }
                None => true,
            }
        });
        // A burst of new flows leaves a large, mostly empty table behind:
        // give the memory back once most of it is unused.
        if self.waiting.capacity() > 4 * self.waiting.len().max(1024) {
            self.waiting.shrink_to(2 * self.waiting.len());
        }
    }

    /// Flows waiting now.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_common::test_util::KeyBuilder;

    fn key(port: u16) -> FlowKey {
        KeyBuilder::new().port(port).build()
    }

    #[test]
    fn flows_wait_until_decided_and_their_deltas_add_up() {
        let mut p = PendingFlows::default();
        let t0 = Instant::now();
        let one = Counters {
            bytes: 10,
            packets: 1,
        };
        p.add(&[(key(1), one), (key(2), one)], t0);
        p.add(&[(key(1), one)], t0 + Duration::from_secs(1));
        let mut out = Vec::new();
        p.release(
            t0 + Duration::from_secs(1),
            Duration::from_secs(3),
            |k, _| (k.port == 1).then_some("named"),
            |k, l, c| out.push((k.port, l, *c)),
        );
        assert_eq!(
            out,
            vec![(
                1,
                "named",
                Counters {
                    bytes: 20,
                    packets: 2
                }
            )]
        );
        assert_eq!(p.len(), 1);
    }
}

//! The history as an output: each drain's labelled deltas shared out among
//! the subjects as the live view shares them ([`Shares`]), added to the
//! minute they were drained in, for the next commit.

use std::{
    collections::HashMap,
    time::{Instant, SystemTime},
};

use super::{History, Totals, add_totals, minute_of};
use crate::{
    model::{
        OTHER,
        net::LocalNets,
        subjects::{Shares, Side, Subject},
    },
    outputs::sink::{LabelledDrain, Sink},
};

/// Names of one subject one drain adds at most; the rest go under
/// [`OTHER`] (the pending counts must stay bounded whatever the labels).
pub const MAX_NAMES_PER_DRAIN: usize = 16_384;

pub struct HistorySink {
    /// None once finished.
    history: Option<History>,
    local: LocalNets,
}

impl HistorySink {
    pub fn new(history: History, local: LocalNets) -> Self {
        Self {
            history: Some(history),
            local,
        }
    }
}

/// One drain's counts per subject (by `Subject as usize`) and name, looked
/// up by `&str`, so that adding to a known name allocates nothing (this
/// runs for every flow of every drain).
#[derive(Default)]
struct DrainCounts([HashMap<String, Totals>; Subject::ALL.len()]);

impl DrainCounts {
    fn add(&mut self, subject: Subject, name: &str, side: Side, delta: &ntm_common::Counters) {
        let table = &mut self.0[subject as usize];
        let name = if table.len() >= MAX_NAMES_PER_DRAIN && !table.contains_key(name) {
            OTHER
        } else {
            name
        };
        let mut one = Totals::default();
        one[side.index()] = *delta;
        match table.get_mut(name) {
            Some(totals) => add_totals(totals, &one),
            None => {
                table.insert(name.to_string(), one);
            }
        }
    }

    fn into_counts(self) -> impl Iterator<Item = ((Subject, String), Totals)> {
        let Self(tables) = self;
        Subject::ALL
            .into_iter()
            .zip(tables)
            .flat_map(|(subject, table)| {
                table
                    .into_iter()
                    .map(move |(name, totals)| ((subject, name), totals))
            })
    }
}

impl Sink for HistorySink {
    fn labelled(&mut self, drain: &LabelledDrain, _now: Instant) {
        let Some(history) = &self.history else {
            return;
        };
        let mut counts = DrainCounts::default();
        for flow in &drain.flows {
            Shares::of_flow(
                &self.local,
                &flow.key,
                &flow.iface,
                (&flow.src, &flow.dst),
                &flow.service,
            )
            .each(|subject, name, way| counts.add(subject, name, way, &flow.delta));
        }
        for overflow in &drain.overflow {
            let side = Side::Hook(overflow.hook);
            counts.add(Subject::Interface, &overflow.iface, side, &overflow.delta);
        }
        history.add(minute_of(SystemTime::now()), counts.into_counts());
    }

    /// Commits what is pending and stops the writer.
    fn finish(&mut self) {
        if let Some(history) = self.history.take() {
            history.stop();
        }
    }
}

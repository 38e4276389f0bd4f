//! The series budget: at most `--max-series` label sets; beyond it a new
//! label set is folded into a series whose hosts and service are `other`,
//! so that its bytes still add up. Idle series expire after
//! `--series-ttl`.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use ntm_common::Counters;
use prometheus::{IntCounter, IntGauge};

use super::series::TrafficSeries;
use crate::model::{OTHER, series::Label, sync};

pub struct SeriesBudget {
    series: Arc<RwLock<TrafficSeries>>,
    labels: Vec<Label>,
    /// [`OTHER`], one copy for every folded value.
    other: Arc<str>,
    max_series: usize,
    ttl: Duration,
    count: IntGauge,
    folded: IntCounter,
    expired: IntCounter,
}

impl SeriesBudget {
    /// `count`, `folded` and `expired` are the self-metrics it keeps up to
    /// date.
    pub fn new(
        series: Arc<RwLock<TrafficSeries>>,
        labels: Vec<Label>,
        max_series: usize,
        ttl: Duration,
        (count, folded, expired): (IntGauge, IntCounter, IntCounter),
    ) -> Self {
        Self {
            series,
            labels,
            other: Arc::from(OTHER),
            max_series,
            ttl,
            count,
            folded,
            expired,
        }
    }

    /// Adds to the series of `values` (label values in `labels` order), or
    /// to its folded series when the budget is spent.
    pub fn add(&mut self, values: Vec<Arc<str>>, delta: &Counters, now: Instant) {
        let over_budget = {
            let series = sync::read(&self.series);
            !series.contains(&values) && series.len() >= self.max_series
        };
        let values = if over_budget {
            self.folded.inc();
            self.fold(values)
        } else {
            values
        };
        self.add_unbudgeted(&values, delta, now);
    }

    /// Traffic the kernel counted outside its flow table for want of room,
    /// on interface `iface`: every other label `other`, outside the budget
    /// (one series per interface at most).
    pub fn add_overflow(&mut self, iface: &str, delta: &Counters, now: Instant) {
        let values: Vec<Arc<str>> = self
            .labels
            .iter()
            .map(|label| match label {
                Label::Iface => Arc::from(iface),
                _ => Arc::clone(&self.other),
            })
            .collect();
        self.add_unbudgeted(&values, delta, now);
    }

    /// Beyond the budget: hosts and service become "other"; protocol,
    /// direction and interface (a handful of values each) are kept.
    fn fold(&self, mut values: Vec<Arc<str>>) -> Vec<Arc<str>> {
        for (value, label) in values.iter_mut().zip(&self.labels) {
            if matches!(label, Label::Src | Label::Dst | Label::Service) {
                *value = Arc::clone(&self.other);
            }
        }
        values
    }

    fn add_unbudgeted(&mut self, values: &[Arc<str>], delta: &Counters, now: Instant) {
        let mut series = sync::write(&self.series);
        series.add(values, delta.bytes, delta.packets, now);
        self.count.set(series.len() as i64);
    }

    /// Drops series without traffic for longer than the TTL.
    pub fn expire(&mut self, now: Instant) {
        let mut series = sync::write(&self.series);
        let removed = series.expire(now, self.ttl);
        self.expired.inc_by(removed as u64);
        self.count.set(series.len() as i64);
    }

    pub fn len(&self) -> usize {
        sync::read(&self.series).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

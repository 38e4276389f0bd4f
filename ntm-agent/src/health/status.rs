//! ntm's health as the page and `/api/v1/status` show it, set once per
//! drain by the pipeline.

use std::time::SystemTime;

use ntm_common::Counters;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainStatus {
    pub series: usize,
    pub max_series: usize,
    pub series_folded: u64,
    /// Frames that found no room in the flow table (counted under `other`).
    pub overflow: Counters,
    pub flow_table_capacity: u32,
    pub waiting_flows: usize,
    pub drains: u64,
    pub last_drain: Option<SystemTime>,
}

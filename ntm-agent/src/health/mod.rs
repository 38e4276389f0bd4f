//! ntm's own health: its metrics, the self-check against the kernel's
//! interface counters, and which requested interfaces are attached.
//!
//! - [`self_metrics`]: ntm's own metrics, in a `prometheus` registry;
//! - [`coverage`]: per attached interface and hook, ntm's frames next to
//!   the kernel's interface statistics;
//! - [`attached`]: whether each requested interface is attached, for
//!   `/healthz` and the API;
//! - [`status`]: the pipeline's state after each drain, for the API.

pub mod attached;
pub mod coverage;
pub mod self_metrics;
pub mod status;

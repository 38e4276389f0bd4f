//! The shared model: what every room may use, and what no room owns.
//!
//! - [`net`]: addresses and networks (CIDR, the local networks that decide
//!   a flow's direction), MAC addresses;
//! - [`series`]: the labels a traffic series may carry;
//! - [`subjects`]: devices, servers, services and interfaces, and how a
//!   flow's traffic is shared out among them;
//! - [`sync`]: the one policy for a poisoned lock;
//! - [`units`]: durations as flags and config files write them;
//! - [`OTHER`]: the label value of everything beyond a bound.
//!
//! It depends on nothing else in the agent.

pub mod net;
pub mod series;
pub mod subjects;
pub mod sync;
pub mod units;

/// Label value (and live-view name) of what stands for traffic beyond a
/// bound: the series budget, the kernel's flow table, a live-view table.
pub const OTHER: &str = "other";

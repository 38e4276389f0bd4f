//! ntm's agent, laid out as its data flow:
//!
//! - [`config`]: flags and `NTM_*` environment variables, and the options
//!   of each stage built from them;
//! - [`kernel`]: the kernel side: filters, loading, attaching, draining
//!   the flow tables, and the raw system calls (`kernel::sys`);
//! - [`pipeline`]: the one place the export stages are wired: drained flow
//!   deltas in, traffic series out;
//! - [`export`]: the export stages: names, labels, the series budget, the
//!   series themselves, self-metrics, and the HTTP endpoint.
//!
//! `main.rs` builds the stages from the configuration and runs the loop.
//! See ARCHITECTURE.md for where a new name source, output or hook goes.

pub mod config;
pub mod export;
pub mod kernel;
pub mod pipeline;

//! ntm's agent, laid out as its data flow. Each room depends only on the
//! rooms listed before it:
//!
//! - [`model`]: what every room shares: networks, MACs, series labels,
//!   durations, `other`;
//! - [`sys`]: every raw system call ntm makes itself;
//! - [`filter`]: tcpdump expressions, compiled by libpcap and translated to
//!   eBPF for the kernel programs;
//! - [`kernel`]: the kernel side: loading, attaching, draining the flow
//!   tables, the frames handed over for names;
//! - [`health`]: ntm's own metrics and the self-check against the
//!   kernel's interface counters;
//! - [`names`]: host names, from the naming ladder's sources;
//! - [`pipeline`]: the stages a drain's deltas go through before the
//!   outputs: pending (new flows wait for names), labels, services;
//! - [`outputs`]: what the labelled deltas become: Prometheus series (with
//!   the series budget), the live view, the history database;
//! - [`web`]: the HTTP endpoint (`/metrics`, the JSON API, the page),
//!   secured as the web config says;
//! - [`config`]: flags and `NTM_*` environment variables, and each room's
//!   options built from them;
//! - [`agent`]: wires the rooms together and runs the loop.
//!
//! `main.rs` parses the command line and reports a failure as one line.
//! See ARCHITECTURE.md for where a new name source, output or hook goes.

pub mod agent;
pub mod config;
pub mod filter;
pub mod health;
pub mod kernel;
pub mod model;
pub mod names;
pub mod outputs;
pub mod pipeline;
pub mod sys;
pub mod web;

//! ntm's agent, in the order data flows through it:
//!
//! - [`config`]: flags and `NTM_*` environment variables;
//! - [`services`]: known service ports (/etc/services + `--service`);
//! - [`filter`]: tcpdump filter expressions (libpcap), translated for the
//!   kernel and run before counting;
//! - [`datapath`]: loads the kernel programs and their maps;
//! - [`netlink`] and [`attach`]: finds the links (bridges and their ports)
//!   and hooks the programs to them;
//! - [`privileges`]: gives up root after attaching (`--user`);
//! - [`drain`]: swaps and reads the kernel's flow tables without loss;
//! - [`flows`]: running totals of the drained deltas;
//! - [`labels`]: label values for a flow (services, protocols, direction);
//! - [`names`] and [`dns`]: host names for src/dst (reverse DNS);
//! - [`metrics`] and [`series`]: traffic counters (budget, expiry) and
//!   self-metrics;
//! - [`http`]: `/metrics` and `/healthz`;
//! - [`agent`]: the lifecycle that wires these together.

pub mod agent;
pub mod attach;
pub mod config;
pub mod datapath;
pub mod dns;
pub mod drain;
pub mod filter;
pub mod flows;
pub mod http;
pub mod labels;
pub mod metrics;
pub mod names;
pub mod netlink;
pub mod privileges;
pub mod series;
pub mod services;

//! The stages a drain's flow deltas go through before the outputs:
//!
//! - [`pending`]: new flows wait (bounded) for their hosts' names;
//! - [`labels`] and [`services`]: label values (service names, protocols,
//!   direction from the local networks).
//!
//! `crate::agent::pipeline` wires them with the names and the outputs.

pub mod labels;
pub mod pending;
pub mod services;

//! Present so that ntm-agent can name this crate as a build dependency
//! (cargo rebuilds the agent when it changes); the programs are in main.rs.
#![no_std]

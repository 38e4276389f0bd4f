//! The HTTP endpoint: `/metrics`, `/healthz`, the JSON API under
//! `/api/v1/` and the live page at `/`.
//!
//! - [`http`]: the routes, served on hyper, over TLS where the web config
//!   says, behind the rate limit and basic auth;
//! - [`web_config`]: the exporter-toolkit web config file;
//! - [`api`]: the JSON documents, from the live view and the history;
//! - [`page`]: the page's files, built into the binary.

pub mod api;
pub mod http;
pub mod page;
pub mod web_config;

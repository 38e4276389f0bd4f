//! The HTTP endpoint: `/metrics`, `/healthz`, the JSON API under
//! `/api/v1/` and the live page at `/`.
//!
//! - [`http`]: the routes, served on hyper, over TLS where the web config
//!   says, behind the [`guard`];
//! - [`web_config`]: the exporter-toolkit web config file, read again when
//!   it changes;
//! - [`tls`]: its `tls_server_config`, as a rustls server configuration;
//! - [`auth`]: its `basic_auth_users`, checked with bcrypt;
//! - [`guard`]: the rate limit, then basic auth, before every request but
//!   `/healthz`;
//! - [`api`]: the JSON documents, from the live view and the history;
//! - [`page`]: the page's files, built into the binary.

pub mod api;
pub mod auth;
pub mod guard;
pub mod http;
pub mod page;
pub mod tls;
pub mod web_config;

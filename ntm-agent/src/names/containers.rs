//! Containers on this host by their addresses (the ladder's second rung):
//! the names Docker or Podman give their containers, read from the
//! engine's API socket with bollard (Podman serves the same API).
//!
//! A task asks every socket there is every few seconds; the drain loop
//! only reads the shared table. A socket that is missing is skipped
//! quietly (most hosts run no engine); one that fails is logged once, and
//! again only after it worked in between.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use bollard::{ClientVersion, Docker, query_parameters::ListContainersOptionsBuilder};

use super::source::{Lookup, NameSource, Query, Source, TableSizes};
use crate::model::series::usable_name;
use crate::model::sync;

/// Where Podman (as root) and Docker listen by default; the ones that
/// exist are asked.
pub const DEFAULT_SOCKETS: [&str; 3] = [
    "/run/podman/podman.sock",
    "/var/run/docker.sock",
    "/run/docker.sock",
];

/// How often the engines are asked.
pub const POLL_EVERY: Duration = Duration::from_secs(5);
/// Container addresses kept at most.
pub const MAX_CONTAINER_ADDRESSES: usize = 65_536;
/// How long one request may take.
const REQUEST_TIMEOUT_SECS: u64 = 5;
/// API 1.40 (Docker 19.03): old enough for every engine still in use, and
/// what Podman's compatible API serves.
const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 40,
};

/// The addresses of running containers and their names, shared between
/// the poller and the labels.
#[derive(Clone, Default)]
pub struct ContainerNames {
    table: Arc<RwLock<HashMap<IpAddr, String>>>,
}

impl ContainerNames {
    pub fn get(&self, ip: IpAddr) -> Option<String> {
        sync::read(&self.table).get(&ip).cloned()
    }

    pub fn len(&self) -> usize {
        sync::read(&self.table).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn replace(&self, table: HashMap<IpAddr, String>) {
        *sync::write(&self.table) = table;
    }

    /// Asks the engines behind `sockets` (the default ones if empty) now
    /// and every [`POLL_EVERY`], on a task of the current tokio runtime.
    pub fn spawn(sockets: Vec<PathBuf>) -> Self {
        let names = Self::default();
        let shared = names.clone();
        let explicit = !sockets.is_empty();
        let sockets: Vec<PathBuf> = if explicit {
            sockets
        } else {
            DEFAULT_SOCKETS.iter().map(PathBuf::from).collect()
        };
        tokio::spawn(async move {
            let mut failing: HashMap<PathBuf, bool> = HashMap::new();
            let mut ticker = tokio::time::interval(POLL_EVERY);
            loop {
                ticker.tick().await;
                let mut table = HashMap::new();
                for socket in &sockets {
                    // A default socket that is not there: no engine, no noise.
                    if !explicit && !socket.exists() {
                        continue;
                    }
                    let was_failing = failing.get(socket).copied().unwrap_or(false);
                    match list(socket).await {
                        Ok(found) => {
                            if was_failing || !failing.contains_key(socket) {
                                log::info!(
                                    "container names: {} containers with addresses from {}",
                                    found.len(),
                                    socket.display()
                                );
                            }
                            failing.insert(socket.clone(), false);
                            for (ip, name) in found {
                                if table.len() < MAX_CONTAINER_ADDRESSES {
                                    table.entry(ip).or_insert(name);
                                }
                            }
                        }
                        Err(e) => {
                            if !was_failing {
                                log::warn!(
                                    "container names: asking {} failed: {e} (is the engine running, and may ntm read its socket? --no-containers turns this off)",
                                    socket.display()
                                );
                            }
                            failing.insert(socket.clone(), true);
                        }
                    }
                }
                shared.replace(table);
            }
        });
        names
    }
}

/// The running containers' addresses and names behind one socket.
async fn list(socket: &Path) -> Result<Vec<(IpAddr, String)>, bollard::errors::Error> {
    let path = socket.to_string_lossy();
    let docker = Docker::connect_with_socket(&path, REQUEST_TIMEOUT_SECS, &API_VERSION)?;
    let options = ListContainersOptionsBuilder::new().all(false).build();
    let containers = docker.list_containers(Some(options)).await?;
    let mut found = Vec::new();
    for container in containers {
        let Some(name) = container
            .names
            .as_ref()
            .and_then(|names| names.first())
            .map(|n| n.trim_start_matches('/').to_string())
            .filter(|n| usable_name(n))
        else {
            continue;
        };
        let networks = container
            .network_settings
            .and_then(|s| s.networks)
            .unwrap_or_default();
        for endpoint in networks.values() {
            for address in [&endpoint.ip_address, &endpoint.global_ipv6_address]
                .into_iter()
                .flatten()
            {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    found.push((ip, name.clone()));
                }
            }
        }
    }
    Ok(found)
}
impl NameSource for ContainerNames {
    fn name(&mut self, query: &Query) -> Lookup {
        match self.get(query.ip) {
            Some(name) => Lookup::Name(name, Source::Container),
            None => Lookup::Next,
        }
    }

    fn table_sizes(&self, sizes: &mut TableSizes) {
        sizes.containers += self.len();
    }
}

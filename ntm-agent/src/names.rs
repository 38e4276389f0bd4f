//! Host names for the `src`/`dst` labels: asynchronous, cached, bounded
//! reverse DNS, and labels that never change during a series' life.
//!
//! Lookups run on worker threads; the drain loop only reads the cache. A
//! flow whose host has no answer yet waits (a bounded time, `--name-wait`)
//! before it is first exported, so that a name arriving a moment later does
//! not split its counter into an address series and a name series. Once an
//! address's label is decided it is kept while it is in use ("sticky").

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread,
    time::{Duration, Instant},
};

use prometheus::IntCounterVec;

use crate::{
    dns::{PtrAnswer, query_ptr},
    labels::LocalNets,
};

/// Cached answers are kept at least this long (servers that answer TTL 0
/// would otherwise be asked on every drain) and at most this long.
const MIN_CACHE: Duration = Duration::from_secs(30);
const MAX_CACHE: Duration = Duration::from_secs(3600);
/// After a failure (timeout, server error), ask again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct NameOptions {
    /// None: addresses only (`--numeric`, or no resolver configured).
    pub server: Option<SocketAddr>,
    pub timeout: Duration,
    pub workers: usize,
    /// Lookups waiting for a worker; beyond it new ones are dropped (and the
    /// address shown).
    pub queue: usize,
    /// Keep remote hosts' full names instead of their registrable domain.
    pub fqdn: bool,
    /// How long a new flow waits for its hosts' names before it is exported
    /// with addresses.
    pub wait: Duration,
}

#[derive(Clone, Debug)]
enum Entry {
    Pending,
    Done {
        name: Option<String>,
        refresh_at: Instant,
    },
}

/// The shared cache and the queue to the workers.
#[derive(Clone)]
pub struct Resolver {
    cache: Arc<Mutex<HashMap<IpAddr, Entry>>>,
    queue: SyncSender<IpAddr>,
    lookups: IntCounterVec,
}

impl Resolver {
    /// Starts `options.workers` threads asking `server`.
    pub fn start(server: SocketAddr, options: &NameOptions, lookups: IntCounterVec) -> Self {
        let (queue, requests) = sync_channel::<IpAddr>(options.queue.max(1));
        let requests = Arc::new(Mutex::new(requests));
        let resolver = Self {
            cache: Arc::default(),
            queue,
            lookups,
        };
        for n in 0..options.workers.max(1) {
            let worker = resolver.clone();
            let requests = Arc::clone(&requests);
            let timeout = options.timeout;
            let spawned = thread::Builder::new()
                .name(format!("ntm-dns-{n}"))
                .spawn(move || worker.work(&requests, server, timeout));
            if let Err(e) = spawned {
                log::warn!("could not start DNS worker {n}: {e}");
            }
        }
        resolver
    }

    fn work(&self, requests: &Mutex<Receiver<IpAddr>>, server: SocketAddr, timeout: Duration) {
        loop {
            let next = match requests.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok(ip) = next else { return };
            let (result, name, keep) = match query_ptr(server, ip, timeout) {
                Ok(PtrAnswer::Name { name, ttl }) => ("ok", Some(name), ttl),
                Ok(PtrAnswer::NoName { ttl }) => ("no_name", None, ttl),
                Ok(PtrAnswer::ServerError(_)) => ("server_error", None, RETRY_AFTER),
                Err(crate::dns::DnsError::Timeout { .. }) => ("timeout", None, RETRY_AFTER),
                Err(e) => {
                    log::debug!("reverse lookup of {ip}: {e}");
                    ("error", None, RETRY_AFTER)
                }
            };
            self.lookups.with_label_values(&[result]).inc();
            let refresh_at = Instant::now() + keep.clamp(MIN_CACHE, MAX_CACHE);
            if let Ok(mut cache) = self.cache.lock() {
                cache.insert(ip, Entry::Done { name, refresh_at });
            }
        }
    }

    /// The cached answer for `ip`: Some(name or None) when known, None while
    /// a lookup is under way (one is started if needed). Never blocks on DNS.
    pub fn lookup(&self, ip: IpAddr, now: Instant) -> Option<Option<String>> {
        let Ok(mut cache) = self.cache.lock() else {
            return Some(None);
        };
        match cache.get(&ip) {
            Some(Entry::Done { name, refresh_at }) => {
                let name = name.clone();
                if now >= *refresh_at && self.enqueue(ip) {
                    // Keep answering with the old name until the new one is in.
                    cache.insert(
                        ip,
                        Entry::Done {
                            name: name.clone(),
                            refresh_at: now + RETRY_AFTER,
                        },
                    );
                }
                Some(name)
            }
            Some(Entry::Pending) => None,
            None => {
                if self.enqueue(ip) {
                    cache.insert(ip, Entry::Pending);
                    None
                } else {
                    cache.insert(
                        ip,
                        Entry::Done {
                            name: None,
                            refresh_at: now + MIN_CACHE,
                        },
                    );
                    Some(None)
                }
            }
        }
    }

    fn enqueue(&self, ip: IpAddr) -> bool {
        match self.queue.try_send(ip) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.lookups.with_label_values(&["dropped"]).inc();
                false
            }
        }
    }
}

struct Sticky {
    label: String,
    last_used: Instant,
}

/// Decides and remembers the host label of each address.
pub struct HostLabels {
    resolver: Option<Resolver>,
    local: LocalNets,
    fqdn: bool,
    wait: Duration,
    sticky: HashMap<IpAddr, Sticky>,
}

impl HostLabels {
    pub fn new(resolver: Option<Resolver>, local: LocalNets, options: &NameOptions) -> Self {
        Self {
            resolver,
            local,
            fqdn: options.fqdn,
            wait: options.wait,
            sticky: HashMap::new(),
        }
    }

    /// The label of `ip` for a flow first seen at `first_seen`, or None if
    /// the flow should wait for a name a little longer.
    pub fn label(&mut self, ip: IpAddr, first_seen: Instant, now: Instant) -> Option<String> {
        if let Some(s) = self.sticky.get_mut(&ip) {
            s.last_used = now;
            return Some(s.label.clone());
        }
        let label = match &self.resolver {
            None => ip.to_string(),
            Some(resolver) => match resolver.lookup(ip, now) {
                Some(Some(name)) => self.name_label(ip, name),
                Some(None) => ip.to_string(),
                None if now.duration_since(first_seen) < self.wait => return None,
                None => ip.to_string(),
            },
        };
        self.sticky.insert(
            ip,
            Sticky {
                label: label.clone(),
                last_used: now,
            },
        );
        Some(label)
    }

    /// Local hosts keep their whole name (it is the device's identity);
    /// remote hosts collapse to their registrable domain unless --fqdn.
    fn name_label(&self, ip: IpAddr, name: String) -> String {
        if self.fqdn || self.local.contains(ip) {
            return name;
        }
        match psl::domain_str(&name) {
            Some(domain) => domain.to_string(),
            None => name,
        }
    }

    /// Forgets labels not used for `ttl` (their series have expired too).
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        self.sticky
            .retain(|_, s| now.duration_since(s.last_used) <= ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> NameOptions {
        NameOptions {
            server: None,
            timeout: Duration::from_secs(1),
            workers: 1,
            queue: 16,
            fqdn: false,
            wait: Duration::from_secs(2),
        }
    }

    fn local() -> LocalNets {
        LocalNets(vec!["192.168.0.0/16".parse().unwrap()])
    }

    #[test]
    fn registrable_domains_for_remote_hosts_whole_names_for_local_ones() {
        let h = HostLabels::new(None, local(), &options());
        let remote: IpAddr = "93.184.216.34".parse().unwrap();
        let lan: IpAddr = "192.168.1.5".parse().unwrap();
        assert_eq!(h.name_label(remote, "news.bbc.co.uk".into()), "bbc.co.uk");
        assert_eq!(h.name_label(remote, "a.b.1e100.net".into()), "1e100.net");
        assert_eq!(
            h.name_label(lan, "laptop.home.arpa".into()),
            "laptop.home.arpa"
        );
        let fqdn = HostLabels::new(
            None,
            local(),
            &NameOptions {
                fqdn: true,
                ..options()
            },
        );
        assert_eq!(
            fqdn.name_label(remote, "news.bbc.co.uk".into()),
            "news.bbc.co.uk"
        );
    }

    #[test]
    fn without_a_resolver_labels_are_addresses_at_once() {
        let mut h = HostLabels::new(None, local(), &options());
        let now = Instant::now();
        let ip: IpAddr = "2001:2::1".parse().unwrap();
        assert_eq!(h.label(ip, now, now), Some("2001:2::1".into()));
    }

    #[test]
    fn sticky_labels_expire_when_unused() {
        let mut h = HostLabels::new(None, local(), &options());
        let t0 = Instant::now();
        let ip: IpAddr = "198.18.0.9".parse().unwrap();
        h.label(ip, t0, t0);
        h.expire(t0 + Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!(h.sticky.len(), 1);
        h.expire(t0 + Duration::from_secs(11), Duration::from_secs(10));
        assert!(h.sticky.is_empty());
    }
}

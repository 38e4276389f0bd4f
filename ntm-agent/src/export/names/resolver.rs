//! Reverse DNS on worker threads, behind a cache the drain loop reads
//! without ever waiting for the network.

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

use super::{
    NameOptions,
    dns::{DnsError, PtrAnswer, query_ptr},
};

/// Cached answers are kept at least this long (servers that answer TTL 0
/// would otherwise be asked on every drain) and at most this long.
const MIN_CACHE: Duration = Duration::from_secs(30);
const MAX_CACHE: Duration = Duration::from_secs(3600);
/// After a failure (timeout, server error), ask again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);

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
                Err(DnsError::Timeout { .. }) => ("timeout", None, RETRY_AFTER),
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

//! Reverse DNS (PTR) with hickory-resolver, on a thread of its own, behind
//! a bounded cache that the drain loop reads without ever waiting for the
//! network.
//!
//! hickory brings what a DNS client needs and ntm had not: every
//! `nameserver` and the options of `/etc/resolv.conf`, TCP when an answer
//! is truncated, and a parser that has seen the world's DNS servers.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_resolver::{
    Resolver as Hickory, TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig},
    net::{DnsError, NetError, runtime::TokioRuntimeProvider},
    proto::rr::{Name, RData},
};
use lru::LruCache;
use prometheus::IntCounterVec;
use tokio::sync::{Semaphore, mpsc};

use super::{
    NameOptions,
    source::{Lookup, NameSource, Query, Source},
};
use crate::{health::self_metrics::DnsResult, model::sync};

/// Cached answers are kept at least this long (servers that answer TTL 0
/// would otherwise be asked on every drain) and at most this long.
const MIN_CACHE: Duration = Duration::from_secs(30);
const MAX_CACHE: Duration = Duration::from_secs(3600);
/// After a failure (timeout, server error), ask again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// How long "no name" answers are remembered when the server gives no TTL.
const NEGATIVE_TTL: Duration = Duration::from_secs(300);
/// Addresses the cache holds at most; past it, the least recently asked
/// for is forgotten.
pub const MAX_CACHED: NonZeroUsize = NonZeroUsize::new(65_536).expect("not zero");

/// Which DNS servers to ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// Those of /etc/resolv.conf, with its options.
    System,
    /// This one (`--dns-server`), over UDP and TCP.
    Server(SocketAddr),
}

#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("reading the system's DNS configuration (/etc/resolv.conf): {0}")]
    SystemConfig(#[source] NetError),
    #[error("setting up the DNS resolver: {0}")]
    Build(#[source] NetError),
    #[error("starting the DNS thread: {0}")]
    Thread(#[source] std::io::Error),
}

#[derive(Clone, Debug)]
enum Entry {
    Pending,
    Done {
        name: Option<String>,
        refresh_at: Instant,
    },
}

/// The shared cache and the queue to the lookups.
#[derive(Clone)]
pub struct Resolver {
    cache: Arc<Mutex<LruCache<IpAddr, Entry>>>,
    queue: mpsc::Sender<IpAddr>,
    lookups: IntCounterVec,
}

/// How one lookup ended, and how long to keep what it found.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Name(String, Duration),
    NoName(Duration),
    ServerError,
    Timeout,
    Error,
}

impl Outcome {
    fn result(&self) -> DnsResult {
        match self {
            Outcome::Name(..) => DnsResult::Ok,
            Outcome::NoName(_) => DnsResult::NoName,
            Outcome::ServerError => DnsResult::ServerError,
            Outcome::Timeout => DnsResult::Timeout,
            Outcome::Error => DnsResult::Error,
        }
    }
}

/// The ladder's last rung: reverse DNS, which a new flow waits for at most
/// `--name-wait` from when it was first seen.
pub struct ReverseDns {
    resolver: Resolver,
    wait: Duration,
}

impl ReverseDns {
    /// Starts the resolver `options` asks for; None with `--numeric`, or
    /// (with a warning) when it cannot start.
    pub fn start(options: &NameOptions, lookups: IntCounterVec) -> Option<Self> {
        let upstream = options.upstream.as_ref()?;
        match Resolver::start(upstream, options, lookups) {
            Ok(resolver) => Some(Self {
                resolver,
                wait: options.wait,
            }),
            Err(e) => {
                log::warn!(
                    "host names: no reverse DNS, addresses where no other source names them: {e}"
                );
                None
            }
        }
    }
}

impl NameSource for ReverseDns {
    fn name(&mut self, query: &Query) -> Lookup {
        match self.resolver.lookup(query.ip, query.now) {
            Some(Some(name)) => Lookup::Name(name, Source::ReverseDns),
            Some(None) => Lookup::Next,
            None if query.now.duration_since(query.first_seen) < self.wait => Lookup::Wait,
            None => Lookup::Next,
        }
    }
}

impl Resolver {
    /// Starts the DNS thread: at most `options.workers` lookups in flight,
    /// each given `options.timeout` in all, `options.queue` waiting.
    pub fn start(
        upstream: &Upstream,
        options: &NameOptions,
        lookups: IntCounterVec,
    ) -> Result<Self, ResolverError> {
        let hickory = build(upstream, options.timeout)?;
        let (queue, requests) = mpsc::channel(options.queue.max(1));
        let resolver = Self {
            cache: Arc::new(Mutex::new(LruCache::new(MAX_CACHED))),
            queue,
            lookups,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ResolverError::Thread)?;
        let worker = resolver.clone();
        let (workers, timeout) = (options.workers.max(1), options.timeout);
        std::thread::Builder::new()
            .name("ntm-dns".into())
            .spawn(move || runtime.block_on(worker.serve(hickory, requests, workers, timeout)))
            .map_err(ResolverError::Thread)?;
        Ok(resolver)
    }

    async fn serve(
        self,
        hickory: TokioResolver,
        mut requests: mpsc::Receiver<IpAddr>,
        workers: usize,
        timeout: Duration,
    ) {
        let in_flight = Arc::new(Semaphore::new(workers));
        while let Some(ip) = requests.recv().await {
            let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                return;
            };
            let (hickory, this) = (hickory.clone(), self.clone());
            tokio::spawn(async move {
                let outcome = match tokio::time::timeout(timeout, reverse(&hickory, ip)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Outcome::Timeout,
                };
                this.record(ip, outcome);
                drop(permit);
            });
        }
    }

    fn record(&self, ip: IpAddr, outcome: Outcome) {
        self.lookups
            .with_label_values(&[outcome.result().as_str()])
            .inc();
        let (name, keep) = match outcome {
            Outcome::Name(name, ttl) => (Some(name), ttl),
            Outcome::NoName(ttl) => (None, ttl),
            Outcome::ServerError | Outcome::Timeout | Outcome::Error => (None, RETRY_AFTER),
        };
        let refresh_at = Instant::now() + keep.clamp(MIN_CACHE, MAX_CACHE);
        sync::lock(&self.cache).put(ip, Entry::Done { name, refresh_at });
    }

    /// The cached answer for `ip`: Some(name or None) when known, None while
    /// a lookup is under way (one is started if needed). Never blocks on DNS.
    pub fn lookup(&self, ip: IpAddr, now: Instant) -> Option<Option<String>> {
        let mut cache = sync::lock(&self.cache);
        match cache.get(&ip) {
            Some(Entry::Done { name, refresh_at }) => {
                let name = name.clone();
                if now >= *refresh_at && self.enqueue(ip) {
                    // Keep answering with the old name until the new one is in.
                    cache.put(
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
                    cache.put(ip, Entry::Pending);
                    None
                } else {
                    cache.put(
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
            Err(_) => {
                self.lookups
                    .with_label_values(&[DnsResult::Dropped.as_str()])
                    .inc();
                false
            }
        }
    }
}

/// A hickory resolver for `upstream`: no cache of its own (ours is bounded
/// and sticky) and no hosts file (static names are a rung of their own).
fn build(upstream: &Upstream, timeout: Duration) -> Result<TokioResolver, ResolverError> {
    let mut builder = match upstream {
        Upstream::System => TokioResolver::builder_tokio().map_err(ResolverError::SystemConfig)?,
        Upstream::Server(server) => {
            let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                .into_iter()
                .map(|mut c| {
                    c.port = server.port();
                    c
                })
                .collect();
            let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
                server.ip(),
                true,
                connections,
            )]);
            Hickory::builder_with_config(config, TokioRuntimeProvider::default())
        }
    };
    // The system's options (ndots, attempts, rotate, ...) stay; these go.
    let options = builder.options_mut();
    options.timeout = timeout;
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Never;
    builder.build().map_err(ResolverError::Build)
}

/// One PTR lookup: the first name answered, lower case, without the
/// trailing dot.
async fn reverse(hickory: &TokioResolver, ip: IpAddr) -> Outcome {
    match hickory.reverse_lookup(Name::from(ip)).await {
        Ok(lookup) => {
            let keep = lookup
                .valid_until()
                .saturating_duration_since(Instant::now());
            let name = lookup
                .answers()
                .iter()
                .find_map(|record| match &record.data {
                    RData::PTR(ptr) => Some(ptr.0.to_utf8()),
                    _ => None,
                });
            match name.map(|n| n.trim_end_matches('.').to_ascii_lowercase()) {
                Some(name) if !name.is_empty() => Outcome::Name(name, keep),
                _ => Outcome::NoName(keep),
            }
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(no))) => Outcome::NoName(
            no.negative_ttl
                .map_or(NEGATIVE_TTL, |ttl| Duration::from_secs(ttl.into())),
        ),
        Err(NetError::Dns(DnsError::ResponseCode(_))) => Outcome::ServerError,
        Err(NetError::Timeout) => Outcome::Timeout,
        Err(e) => {
            log::debug!("reverse lookup of {ip}: {e}");
            Outcome::Error
        }
    }
}

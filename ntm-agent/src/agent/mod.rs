//! The agent: wires the rooms together and runs the loop. It binds the
//! endpoint and reads the web config before touching the kernel (a taken
//! port or a bad config attaches nothing), starts the kernel side, gives up
//! root, builds the pipeline and the web, then drains, follows interfaces,
//! renews the lease and answers signals until SIGINT or SIGTERM, and shuts
//! down with a last drain.

pub mod pipeline;

use std::{net::SocketAddr, path::PathBuf, time::Instant};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use self::pipeline::Pipeline;
use crate::{
    config::Config,
    health::attached::Health,
    kernel::{
        FilterSource, Kernel, KernelError,
        links::{self, LinkEvents},
        load_filter, local_nets,
        observe::{ObservedFrame, Observer, ObserverError},
        privileges,
    },
    model::net::{Cidr, LocalNets, Origin, Place},
    names::this_host::OwnAddresses,
    outputs::history::hand_state_dir_to,
    sys,
    web::{http, web_config::WebConfigWatcher},
};

/// Drains between two expiry passes over the exported series.
const EXPIRE_EVERY: u32 = 10;
/// Drains between two rescans of the interfaces (link events do it sooner).
const RESCAN_EVERY: u32 = 30;
/// How long link events are let settle before the interfaces are re-read.
const LINK_SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs the agent until SIGINT or SIGTERM; an error says what failed, for
/// `main` to print as one line.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // A drain's tables of megabytes go back to the kernel once freed.
    sys::process::return_large_allocations();
    // Before attaching: a SIGTERM that arrives while starting must still
    // lead to a clean detach and final drain, not the default exit.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // Bind before touching the kernel: a taken port fails fast and clean.
    let listener = http::bind(SocketAddr::new(config.http.bind_ip, config.http.port))
        .context("ntm could not start its metrics endpoint")?;
    // Before touching the kernel too: a bad web config attaches nothing.
    let web = config
        .http
        .web_config_file
        .as_deref()
        .map(WebConfigWatcher::load)
        .transpose()
        .context("ntm could not start its metrics endpoint")?;
    if let Some(web) = web.as_ref() {
        log::info!("web config: {}", web.loaded().describe());
    }
    let user = config.privileges.user;
    let kernel_options = config.kernel().context("ntm could not start")?;
    let services = config.services().context("ntm could not start")?;
    let mut kernel = Kernel::start(&kernel_options, &services.known_port_bitmap())
        .context("ntm could not start")?;
    // Before any other thread starts, so that all of them run as `user`.
    if let Some(user) = user {
        kernel
            .hand_pins_to(user.uid, user.gid)
            .context("ntm could not give its pinned state to --user")?;
        // Without it the history stays in memory (and says so): counting
        // does not depend on it.
        if !config.history.no_history
            && let Err(e) = hand_state_dir_to(&config.history.state_dir, user.uid, user.gid)
        {
            log::warn!(
                "history: cannot give {} to --user ({e}; as root, ntm needs CAP_CHOWN for it)",
                config.history.state_dir.display()
            );
        }
        let groups = socket_groups(&config, user.gid);
        privileges::drop_to(user, &groups).context("ntm could not give up root")?;
        log::info!(
            "running as uid {} gid {} with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON only",
            user.uid,
            user.gid
        );
    }

    let options = config.pipeline();
    // This host's addresses, for its own name (None: names are off).
    let own_addresses = options.names.own_addresses.clone();
    let mut pipeline = Pipeline::new(options, services).context("setting up metrics")?;
    let host = Host {
        local: pipeline.local_nets().clone(),
        own_addresses,
    };
    host.follow(&mut kernel);
    if !host.local.is_learnt() {
        log::info!("local networks (--local-net): {}", describe(&host.local));
    }
    pipeline.read_neighbours_with(Box::new(|| match links::neighbours() {
        Ok(entries) => Some(entries),
        Err(e) => {
            log::debug!("reading the neighbour table: {e}");
            None
        }
    }));
    if let Some(macs) = kernel.take_macs() {
        pipeline.look_up_macs_with(Box::new(move |ip| macs.lookup(ip)));
    }
    // What the last agent's pinned tables held: counted while no agent ran.
    if let Some(adopted) = kernel.take_adopted() {
        pipeline.process(&adopted, kernel.interface_labels(), Instant::now());
    }
    let health = Health::default();
    report_attachments(&kernel, &pipeline, &health);
    pipeline.metrics().set_filter(kernel.filter_expression());
    if let Some(expression) = kernel.filter_expression() {
        log::info!("counting only frames that match the filter {expression:?}");
    }
    let mut link_events = spawn_link_watcher();
    // DNS and DHCP frames for names, read as they come (None: off).
    let mut observer = kernel.take_observer();
    let mut observed: Vec<Vec<u8>> = Vec::new();
    let scheme = match web.as_ref() {
        Some(web) if web.loaded().tls.is_some() => "https",
        _ => "http",
    };
    let server = http::Server::start(
        listener,
        http::Site {
            exposition: pipeline.exposition(),
            api: pipeline.api(health.clone()),
            web,
            connection_errors: pipeline.metrics().http_connection_errors.clone(),
            refused: pipeline.metrics().http_refused.clone(),
        },
    )
    .context("starting the metrics endpoint")?;
    log::info!(
        "serving metrics on {scheme}://{}/metrics",
        SocketAddr::new(config.http.bind_ip, config.http.port)
    );

    let mut ticker = tokio::time::interval(config.datapath.drain_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drains: u32 = 0;
    // The lease, renewed well within the orphan timeout (whatever the drain
    // interval), so that the programs count for as long as the agent runs.
    let mut lease = tokio::time::interval(lease_period(kernel_options.orphan_timeout));
    lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = lease.tick() => {
                if let Err(e) = kernel.renew_lease() {
                    log::warn!("{e}");
                }
            }
            read = read_observed(observer.as_mut(), &mut observed) => {
                if let Err(e) = read {
                    log::warn!("names from the wire stop: {e}");
                    observer = None;
                }
                learn(&mut pipeline, &mut observed);
            }
            _ = ticker.tick() => {
                // Answers first, so that they name the flows they led to.
                if let Some(observer) = observer.as_mut() {
                    observer.read_now(&mut observed);
                    learn(&mut pipeline, &mut observed);
                }
                let drained = kernel.drain().context("draining the kernel's flow tables")?;
                let now = Instant::now();
                pipeline.record_observer(observer.as_ref().map(|o| o.drops()).as_ref());
                pipeline.process(&drained, kernel.interface_labels(), now);
                pipeline.check_coverage(&drained, &kernel.hooked(), now);
                drains += 1;
                if drains.is_multiple_of(EXPIRE_EVERY) {
                    pipeline.expire(now);
                }
                // A safety net for missed link events.
                if drains.is_multiple_of(RESCAN_EVERY) {
                    follow_links(&mut kernel, &pipeline, &health);
                    host.follow(&mut kernel);
                }
            }
            Some(()) = link_events.recv() => {
                // Let a burst of events (a bridge gaining a port) settle.
                tokio::time::sleep(LINK_SETTLE).await;
                while link_events.try_recv().is_ok() {}
                follow_links(&mut kernel, &pipeline, &health);
                host.follow(&mut kernel);
            }
            _ = sighup.recv() => reload_filter(&mut kernel, &pipeline, &kernel_options.filter),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    if kernel.keeps_counting() {
        log::info!(
            "stopping: the programs go on counting into the pinned tables for the next start (`ntm-agent detach` stops them for good)"
        );
    } else {
        log::info!("stopping: detaching and draining the last counts");
    }
    for (requested, _) in kernel.health() {
        health.set(&requested, false);
    }
    let labels = kernel.interface_labels().clone();
    let last = kernel.shutdown().context("final drain")?;
    pipeline.process(&last, &labels, Instant::now());
    server.stop();
    pipeline.finish();
    Ok(())
}

/// How often the lease is renewed: four times per orphan timeout, between
/// once a second and once a minute.
fn lease_period(timeout: Option<std::time::Duration>) -> std::time::Duration {
    use std::time::Duration;
    timeout.map_or(Duration::from_secs(60), |t| {
        (t / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    })
}

/// Waits for DNS and DHCP frames (forever when observation is off).
async fn read_observed(
    observer: Option<&mut Observer>,
    records: &mut Vec<Vec<u8>>,
) -> Result<usize, ObserverError> {
    match observer {
        Some(observer) => observer.read(records).await,
        None => std::future::pending().await,
    }
}

/// What the frames read say, into the names.
fn learn(pipeline: &mut Pipeline, records: &mut Vec<Vec<u8>>) {
    let now = Instant::now();
    for record in records.drain(..) {
        if let Some(frame) = ObservedFrame::from_record(&record) {
            pipeline.observe(&frame, now);
        }
    }
}

/// SIGHUP: re-reads the filter source and swaps the new filter in; a filter
/// that does not compile or load is logged and the old one stays.
fn reload_filter(kernel: &mut Kernel, pipeline: &Pipeline, source: &FilterSource) {
    if matches!(source, FilterSource::Expression(_)) {
        log::info!(
            "SIGHUP: the filter was given on the command line or in NTM_FILTERS and cannot change; use -F/--filter-file to change it without a restart"
        );
        return;
    }
    let result = load_filter(source)
        .map_err(KernelError::from)
        .and_then(|filter| kernel.replace_filter(filter));
    let metrics = pipeline.metrics();
    match result {
        Ok(()) => {
            metrics.filter_reloaded(true);
            metrics.set_filter(kernel.filter_expression());
            match kernel.filter_expression() {
                Some(expression) => {
                    log::info!("SIGHUP: now counting frames that match {expression:?}")
                }
                None => log::info!("SIGHUP: no filter: counting every frame"),
            }
        }
        Err(e) => {
            metrics.filter_reloaded(false);
            log::error!("SIGHUP: keeping the current filter: {e}");
        }
    }
}

/// Re-plans the attachments after links changed.
fn follow_links(kernel: &mut Kernel, pipeline: &Pipeline, health: &Health) {
    match kernel.reconcile() {
        Ok(true) => report_attachments(kernel, pipeline, health),
        Ok(false) => {}
        Err(e) => log::warn!("{e}"),
    }
}

/// What the agent keeps up to date from the host's addresses.
struct Host {
    /// The local networks, learnt from the addresses unless given.
    local: LocalNets,
    /// This host's own addresses in the local networks, named by its host
    /// name.
    own_addresses: Option<OwnAddresses>,
}

impl Host {
    /// Reads the host's links and addresses again (at start, and on every
    /// link or address event): the local networks learnt from them (also
    /// for the kernel's MAC learning), and this host's local addresses.
    fn follow(&self, kernel: &mut Kernel) {
        let (links, addresses) = match (links::links(), links::addresses()) {
            (Ok(links), Ok(addresses)) => (links, addresses),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("reading this host's addresses: {e}");
                return;
            }
        };
        if self.local.is_learnt() {
            let monitored = kernel.hooked().iter().map(|h| h.ifindex).collect();
            if self
                .local
                .set(local_nets::learn(&links, &addresses, &monitored))
            {
                log::info!("local networks: {}", describe(&self.local));
                let nets: Vec<Cidr> = self.local.list().iter().map(|n| n.net).collect();
                if let Err(e) = kernel.set_mac_nets(&nets) {
                    log::warn!("devices' MACs are learnt in the earlier local networks: {e}");
                }
            }
        }
        // The host is a device by its local addresses: one outside the
        // local networks (`--local-net` says so) is a server's, as any.
        if let Some(own) = &self.own_addresses {
            own.set(
                addresses
                    .iter()
                    .map(|a| a.address)
                    .filter(|ip| self.local.place(*ip) == Place::Local)
                    .collect(),
            );
        }
    }
}

/// The local networks and their origins, for the log.
fn describe(local: &LocalNets) -> String {
    local
        .list()
        .iter()
        .map(|n| match &n.origin {
            Origin::Given => n.net.to_string(),
            Origin::Interface(name) => format!("{} ({name})", n.net),
            Origin::Private => format!("{} (private)", n.net),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Health per requested interface, and the attach-state metric per
/// interface and mode.
fn report_attachments(kernel: &Kernel, pipeline: &Pipeline, health: &Health) {
    pipeline
        .metrics()
        .set_interfaces(&kernel.interface_states());
    for (requested, ok) in kernel.health() {
        health.set(&requested, ok);
        if !ok {
            log::warn!("{requested}: not attached (yet)");
        }
    }
}

/// Link events from the kernel, on a thread of their own (the wait blocks).
fn spawn_link_watcher() -> tokio::sync::mpsc::UnboundedReceiver<()> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    match LinkEvents::subscribe() {
        Ok(mut events) => {
            let spawned = std::thread::Builder::new()
                .name("ntm-links".into())
                .spawn(move || {
                    while events.wait().is_ok() {
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                });
            if let Err(e) = spawned {
                log::warn!("not following interface changes: {e}");
            }
        }
        Err(e) => {
            log::warn!("not following interface changes (netlink: {e}); rescanning periodically")
        }
    }
    rx
}

/// The groups of the container engines' and runtimes' sockets ntm will
/// ask for names (the configured ones, or the defaults that exist), other
/// than `gid`: kept as supplementary groups when ntm gives up root, so that
/// it can still open them (containerd's and CRI-O's are root's, mode 0660;
/// Docker's the `docker` group's), and reconnect after a runtime restarts.
fn socket_groups(config: &Config, gid: u32) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let mut sockets: Vec<PathBuf> = Vec::new();
    if let Some(configured) = config.container_sockets() {
        sockets.extend(if configured.is_empty() {
            crate::names::containers::DEFAULT_SOCKETS
                .map(PathBuf::from)
                .to_vec()
        } else {
            configured
        });
    }
    if let Some(kubernetes) = config.kubernetes() {
        sockets.extend(if kubernetes.sockets.is_empty() {
            crate::names::kubernetes::DEFAULT_SOCKETS
                .map(PathBuf::from)
                .to_vec()
        } else {
            kubernetes.sockets
        });
    }
    let mut groups: Vec<u32> = Vec::new();
    for socket in sockets {
        let Ok(metadata) = std::fs::metadata(&socket) else {
            continue;
        };
        let group = metadata.gid();
        if group != gid && !groups.contains(&group) {
            log::info!(
                "keeping group {group} (the group of {}) so that ntm can still ask it after giving up root",
                socket.display()
            );
            groups.push(group);
        }
    }
    groups
}

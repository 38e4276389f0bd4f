//! `ntm-agent`: wires the library's stages together and handles signals.

use std::{collections::HashMap, net::SocketAddr, time::Instant};

use anyhow::Context as _;
use clap::Parser as _;
use ntm_agent::{
    agent::{Agent, load_filter},
    config::{Config, FilterSource},
    dns::system_nameserver,
    http::{self, Health},
    labels::{Label, Labeller, LocalNets},
    metrics::{Metrics, MetricsOptions},
    names::NameOptions,
    netlink::LinkEvents,
    privileges,
};
use tokio::signal::unix::{SignalKind, signal};

/// Drains between two expiry passes over the exported series.
const EXPIRE_EVERY: u32 = 10;
/// Drains between two rescans of the interfaces (link events do it sooner).
const RESCAN_EVERY: u32 = 30;
/// How long link events are let settle before the interfaces are re-read.
const LINK_SETTLE: std::time::Duration = std::time::Duration::from_millis(200);
/// Flows listed in the exit summary.
const REPORT_TOP: usize = 50;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = Config::parse();
    let filter_source = config.filter_source().context("ntm could not start")?;
    // Before attaching: a SIGTERM that arrives while starting must still
    // lead to a clean detach and final drain, not the default exit.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // Bind before touching the kernel: a taken port fails fast and clean.
    let listener = http::bind(SocketAddr::new(config.bind_ip, config.port))
        .context("ntm could not start its metrics endpoint")?;
    let user = config
        .user
        .as_deref()
        .map(privileges::resolve_user)
        .transpose()
        .context("ntm could not start")?;
    let mut agent = Agent::start(&config).context("ntm could not start")?;
    // Before any other thread starts, so that all of them run as `user`.
    if let Some(user) = user {
        if let Err(e) = privileges::drop_to(user) {
            let _ = agent.shutdown();
            return Err(e).context("ntm could not give up root");
        }
        log::info!(
            "running as uid {} gid {} with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON only",
            user.uid,
            user.gid
        );
    }

    let mut enabled: Vec<Label> = Vec::new();
    for label in &config.labels {
        if !enabled.contains(label) {
            enabled.push(*label);
        }
    }
    let labeller = Labeller {
        services: agent.services.clone(),
        local: LocalNets(config.local_nets.clone()),
        enabled,
    };
    let mut metrics = Metrics::new(
        MetricsOptions {
            prefix: config.metric_prefix.clone(),
            max_series: config.max_series as usize,
            series_ttl: config.series_ttl,
            flow_table_capacity: config.flow_table_size,
            names: NameOptions {
                server: if config.numeric {
                    None
                } else {
                    config.dns_server.or_else(system_nameserver)
                },
                timeout: config.dns_timeout,
                workers: config.dns_workers as usize,
                queue: 4096,
                fqdn: config.fqdn,
                wait: config.name_wait,
            },
        },
        labeller,
    )
    .context("setting up metrics")?;
    let health = Health::default();
    report_attachments(&agent, &metrics, &health);
    metrics.set_filter(agent.filter_expression());
    if let Some(expression) = agent.filter_expression() {
        log::info!("counting only frames that match the filter {expression:?}");
    }
    let mut link_events = spawn_link_watcher();
    let server = http::Server::start(listener, metrics.exposition(), health.clone())
        .context("starting the metrics endpoint")?;
    log::info!(
        "serving metrics on http://{}/metrics",
        SocketAddr::new(config.bind_ip, config.port)
    );

    let mut names: HashMap<u32, String> = agent.interface_names();
    let mut ticker = tokio::time::interval(config.drain_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drains: u32 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let drained = agent.drain().context("draining the kernel's flow tables")?;
                let now = Instant::now();
                metrics.record(&drained, |i| names.get(&i).cloned().unwrap_or_else(|| i.to_string()), now);
                drains += 1;
                if drains.is_multiple_of(EXPIRE_EVERY) {
                    metrics.expire(now);
                }
                // A safety net for missed link events.
                if drains.is_multiple_of(RESCAN_EVERY) && follow_links(&mut agent, &metrics, &health) {
                    names = agent.interface_names();
                }
            }
            Some(()) = link_events.recv() => {
                // Let a burst of events (a bridge gaining a port) settle.
                tokio::time::sleep(LINK_SETTLE).await;
                while link_events.try_recv().is_ok() {}
                if follow_links(&mut agent, &metrics, &health) {
                    names = agent.interface_names();
                }
            }
            _ = sighup.recv() => reload_filter(&mut agent, &metrics, &filter_source),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    log::info!("stopping: detaching and draining the last counts");
    for (requested, _) in agent.health() {
        health.set(&requested, false);
    }
    let totals = agent.shutdown().context("final drain")?;
    server.stop();
    print!(
        "{}",
        totals.report(REPORT_TOP, |i| names
            .get(&i)
            .cloned()
            .unwrap_or_else(|| i.to_string()))
    );
    Ok(())
}

/// SIGHUP: re-reads the filter source and swaps the new filter in; a filter
/// that does not compile or load is logged and the old one stays.
fn reload_filter(agent: &mut Agent, metrics: &Metrics, source: &FilterSource) {
    if matches!(source, FilterSource::Expression(_)) {
        log::info!(
            "SIGHUP: the filter was given on the command line or in NTM_FILTERS and cannot change; use -F/--filter-file to change it without a restart"
        );
        return;
    }
    let result = load_filter(source)
        .map_err(ntm_agent::agent::AgentError::from)
        .and_then(|filter| agent.replace_filter(filter));
    match result {
        Ok(()) => {
            metrics.filter_reloaded(true);
            metrics.set_filter(agent.filter_expression());
            match agent.filter_expression() {
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

/// Re-plans the attachments after links changed; true if they did.
fn follow_links(agent: &mut Agent, metrics: &Metrics, health: &Health) -> bool {
    match agent.reconcile() {
        Ok(changed) => {
            if changed {
                report_attachments(agent, metrics, health);
            }
            changed
        }
        Err(e) => {
            log::warn!("{e}");
            false
        }
    }
}

/// Health and the attach-state metric, per requested interface.
fn report_attachments(agent: &Agent, metrics: &Metrics, health: &Health) {
    let mode = if agent.attachments().all(|a| a.tcx) {
        "tcx"
    } else {
        "clsact"
    };
    for (requested, ok) in agent.health() {
        metrics.set_attached(&requested, mode, ok);
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

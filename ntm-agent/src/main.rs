//! `ntm-agent`: wires the library's stages together and handles signals.

use std::{collections::HashMap, net::SocketAddr, time::Instant};

use anyhow::{Context as _, bail};
use clap::Parser as _;
use ntm_agent::{
    agent::Agent,
    config::Config,
    dns::system_nameserver,
    http::{self, Health},
    labels::{Label, Labeller, LocalNets},
    metrics::{Metrics, MetricsOptions},
    names::NameOptions,
};
use tokio::signal::unix::{SignalKind, signal};

/// Drains between two expiry passes over the exported series.
const EXPIRE_EVERY: u32 = 10;
/// Flows listed in the exit summary.
const REPORT_TOP: usize = 50;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = Config::parse();
    if let Some(filter) = config.filter_expression() {
        bail!(
            "tcpdump filters ({filter:?}) are not supported by this version of ntm yet; it would count all traffic instead of what the filter selects, so it refuses to start. Remove the filter (positional words or NTM_FILTERS) to count everything on the interface."
        );
    }
    // Before attaching: a SIGTERM that arrives while starting must still
    // lead to a clean detach and final drain, not the default exit.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // Bind before touching the kernel: a taken port fails fast and clean.
    let listener = http::bind(SocketAddr::new(config.bind_ip, config.port))
        .context("ntm could not start its metrics endpoint")?;
    let mut agent = Agent::start(&config).context("ntm could not start")?;

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
    for attachment in agent.attachments() {
        let mode = if attachment.tcx { "tcx" } else { "clsact" };
        metrics.set_attached(&attachment.iface, mode, true);
        health.set(&attachment.iface, true);
    }
    let server = http::Server::start(listener, metrics.exposition(), health.clone())
        .context("starting the metrics endpoint")?;
    log::info!(
        "serving metrics on http://{}/metrics",
        SocketAddr::new(config.bind_ip, config.port)
    );

    let names: HashMap<u32, String> = agent.interface_names();
    let ifname = |index: u32| {
        names
            .get(&index)
            .cloned()
            .unwrap_or_else(|| index.to_string())
    };
    let mut ticker = tokio::time::interval(config.drain_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drains: u32 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let drained = agent.drain().context("draining the kernel's flow tables")?;
                let now = Instant::now();
                metrics.record(&drained, ifname, now);
                drains += 1;
                if drains.is_multiple_of(EXPIRE_EVERY) {
                    metrics.expire(now);
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    log::info!("stopping: detaching and draining the last counts");
    for attachment in agent.attachments() {
        health.set(&attachment.iface, false);
    }
    let totals = agent.shutdown().context("final drain")?;
    server.stop();
    print!("{}", totals.report(REPORT_TOP, ifname));
    Ok(())
}

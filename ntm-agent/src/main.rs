//! `ntm-agent`: wires the library's stages together and handles signals.

use std::time::Instant;

use anyhow::Context as _;
use clap::Parser as _;
use ntm_agent::{agent::Agent, config::Config};
use tokio::signal::unix::{SignalKind, signal};

/// Drains between two summary lines in the log.
const SUMMARY_EVERY: u32 = 60;
/// Flows listed in the exit summary.
const REPORT_TOP: usize = 50;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = Config::parse();
    // Before attaching: a SIGTERM that arrives while starting must still
    // lead to a clean detach and final drain, not the default exit.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut agent = Agent::start(&config).context("ntm could not start")?;
    let mut ticker = tokio::time::interval(config.drain_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drains: u32 = 0;
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                agent.drain().context("draining the kernel's flow tables")?;
                drains += 1;
                if drains.is_multiple_of(SUMMARY_EVERY) {
                    let total = agent.grand_total();
                    log::info!(
                        "{} flows, {} bytes, {} packets counted in {:.0?}",
                        agent.totals.flows.len(), total.bytes, total.packets, started.elapsed()
                    );
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    log::info!("stopping: detaching and draining the last counts");
    let names = agent.interface_names();
    let totals = agent.shutdown().context("final drain")?;
    print!(
        "{}",
        totals.report(REPORT_TOP, |i| names
            .get(&i)
            .cloned()
            .unwrap_or_else(|| i.to_string()))
    );
    Ok(())
}

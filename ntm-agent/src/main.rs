//! `ntm-agent`: parses the command line, runs the agent (`ntm_agent::agent`)
//! or `detach`, and reports a failure as one clear message.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use ntm_agent::config::{Command, Config};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = Config::parse();
    if let Some(Command::Detach { pin_dir }) = &config.command {
        return match detach(pin_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&anyhow::Error::new(e).context("ntm could not start its runtime")),
    };
    match runtime.block_on(ntm_agent::agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// `ntm-agent detach`: stops counting for good here, and says what it
/// removed.
fn detach(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let detached = ntm_agent::kernel::detach(pin_dir).context("ntm could not detach")?;
    println!(
        "ntm: detached {} pinned link(s) and {} clsact filter(s); removed the pinned state (it held {} packets, {} bytes, that no agent exported)",
        detached.links, detached.filters, detached.unexported.packets, detached.unexported.bytes
    );
    Ok(())
}

/// One line on stderr with the whole chain of causes, never a backtrace
/// (whatever RUST_BACKTRACE says): the message says what to do.
fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("ntm-agent: {}", one_line(error));
    ExitCode::FAILURE
}

/// The chain of causes joined by ": ", each said once: most messages name
/// their cause already, and keep it as their source too.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

//! The `node-agent` binary.

#![forbid(unsafe_code)]

use clap::Parser;
use node_agent::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "node-agent",
    version,
    about = "Enrolls pods into the ambient mesh on this node"
)]
enum Cli {
    /// Run the agent.
    Run(Box<Config>),
    /// Remove the CNI plugin's config entries and binary from the host (a real uninstall).
    UninstallCni(node_agent::config::CniInstall),
}

fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse() {
        Cli::Run(config) => init_logging(&config.log, config.log_format)
            .and_then(|()| node_agent::app::run(*config)),
        Cli::UninstallCni(cni) => node_agent::app::uninstall_cni(&cni),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("node-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! The `ztunnel` binary: `run` the proxy, or `generate-ca` for a fresh machine.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ztunnel::config::Config;
use ztunnel::logging::LogControl;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "Zero-trust L4 tunnel for ambient mesh pods"
)]
enum Cli {
    /// Run the proxy.
    Run(Box<Config>),
    /// Write a new local CA (ca-cert.pem, ca-key.pem) into a directory.
    GenerateCa {
        /// Directory to write into; existing CA files are never overwritten.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain recorded in the CA's subject.
        #[arg(long, default_value = mesh_contract::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// How long the CA is valid.
        #[arg(long, default_value = "3650days", value_parser = humantime::parse_duration)]
        validity: Duration,
    },
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse() {
        Cli::Run(config) => LogControl::init(&config.log, config.log_format)
            .map_err(anyhow::Error::msg)
            .and_then(|log| ztunnel::app::run(*config, log)),
        Cli::GenerateCa {
            dir,
            trust_domain,
            validity,
        } => ztunnel::identity::ca::generate(&dir, &trust_domain, validity)
            .map(|()| eprintln!("wrote a new CA for {trust_domain} to {}", dir.display()))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

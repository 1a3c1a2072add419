//! `seckill-worker`: load config, run the order consumer until SIGTERM.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use seckill_contracts::cli::ConfigArgs;
use seckill_contracts::telemetry;
use seckill_workers::{shutdown, worker};

#[derive(Parser)]
#[command(version, about = "Flash-sale order worker")]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Probe listen address; overrides `worker.listen` per instance.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config.load()?;
    telemetry::init_logging(&config.log);
    let addr = args.listen.unwrap_or(config.worker.listen);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    worker::run(config, listener, shutdown::signal()).await?;
    Ok(())
}

//! `seckill-api`: load config, bind, serve until SIGTERM.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use seckill_contracts::cli::ConfigArgs;
use seckill_contracts::telemetry;
use seckill_workers::{api, shutdown};

#[derive(Parser)]
#[command(version, about = "Flash-sale api service (behind the gateway)")]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Listen address; overrides `api.listen` so several instances share a file.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Print the OpenAPI 3.1 document of the public API and exit (what
    /// `GET /api/v1/openapi.json` serves; needs no config or services).
    #[arg(long)]
    print_openapi: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_openapi {
        println!("{}", api::openapi::document_json());
        return Ok(());
    }
    let config = args.config.load()?;
    telemetry::init_logging(&config.log);
    let addr = args.listen.unwrap_or(config.api.listen);
    let listener = seckill_workers::connections::listen(addr, config.api.listen_backlog)
        .with_context(|| format!("binding {addr}"))?;
    let state = api::ApiState::connect(&config)
        .await
        .context("connecting the api to its stores")?;
    api::serve(state, listener, shutdown::signal()).await?;
    Ok(())
}

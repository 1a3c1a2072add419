//! `seckill-wallet`: load config, migrate the wallet database, bind, serve
//! until SIGTERM.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use seckill_contracts::cli::ConfigArgs;
use seckill_contracts::telemetry;
use seckill_workers::{shutdown, wallet};

#[derive(Parser)]
#[command(
    version,
    about = "Flash-sale wallet service (buyers' money, its own database)"
)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Listen address; overrides `wallet.listen` so several instances share a file.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config.load()?;
    telemetry::init_logging(&config.log);
    wallet::migrate(&config)
        .await
        .context("migrating the wallet database")?;
    let addr = args.listen.unwrap_or(config.wallet.listen);
    let listener = seckill_workers::connections::listen(addr, config.wallet.listen_backlog)
        .with_context(|| format!("binding {addr}"))?;
    let state = wallet::WalletState::connect(&config)
        .await
        .context("connecting the wallet to its database")?;
    wallet::serve(state, listener, shutdown::signal()).await?;
    Ok(())
}

//! `seckill-gateway`: load config, build the Pingora server, run it.

use clap::Parser;
use seckill_contracts::cli::ConfigArgs;
use seckill_contracts::telemetry;
use seckill_gateway::Gateway;

// The request path allocates many small, short-lived objects (headers,
// Lua strings and tables); mimalloc handles that pattern far better than
// glibc malloc under two busy threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Flash-sale edge gateway (Pingora)")]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Take over the listening sockets of a running gateway (send it SIGQUIT).
    #[arg(long)]
    upgrade: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config.load()?;
    telemetry::init_logging(&config.log);
    let gateway = Gateway::build(&config, args.upgrade)?;
    tracing::info!(listen = %config.gateway.listen, admin = %config.gateway.admin_listen, "gateway starting");
    gateway.run(None);
    Ok(())
}

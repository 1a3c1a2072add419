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
    /// Compile and selftest the rules folder DIR as this gateway would, print
    /// `{"ok":…,"hash":…,"error":…}` and exit (1 when refused). What
    /// `seckillctl rules push` runs before it stores a bundle.
    #[arg(long, value_name = "DIR")]
    check_rules: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config.load()?;
    if let Some(dir) = args.check_rules {
        let verdict = seckill_gateway::server::check_rules(&config, &dir);
        let ok = verdict.is_ok();
        let body = match verdict {
            Ok(hash) => serde_json::json!({"ok": true, "hash": hash, "error": null}),
            Err(e) => serde_json::json!({"ok": false, "hash": null, "error": e.to_string()}),
        };
        println!("{body}");
        std::process::exit(if ok { 0 } else { 1 });
    }
    telemetry::init_logging(&config.log);
    let gateway = Gateway::build(&config, args.upgrade)?;
    tracing::info!(listen = %config.gateway.listen, admin = %config.gateway.admin_listen, "gateway starting");
    gateway.run(None);
    Ok(())
}

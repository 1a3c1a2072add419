//! `seckill-bench`: see `bench/run` (which builds and calls this) and the
//! library docs.

use clap::Parser;
use seckill_bench::scenarios::{self, Options};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Options::parse();
    let failed_audit = scenarios::run_suite(opts).await?;
    if failed_audit {
        anyhow::bail!("an audit failed: see the report");
    }
    Ok(())
}

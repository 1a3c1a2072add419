//! `seckillctl`: the ops CLI. Each subcommand is a thin call into the
//! library; output is JSON so scripts can read it.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use seckill_contracts::cli::ConfigArgs;
use seckill_contracts::clock::unix_secs;
use seckill_contracts::config::{read_secret, Config};
use seckill_contracts::keys::KeySchema;
use seckill_contracts::redis_client::RedisConn;
use seckill_contracts::telemetry;
use seckill_workers::payments::audit as payments_audit;
use seckill_workers::payments::wallet_client::WalletClient;
use seckill_workers::sales::{self, NewSale};
use seckill_workers::worker::dlq;
use seckill_workers::{audit, connections, demo, keyring, reconcile, rules_rollout, signing_keys};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(version, about = "Flash-sale operations CLI")]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database if needed and apply pending migrations.
    Migrate,
    /// Key material: the dev pair, and rotating the api's signing key.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Inspect and replay the order dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Mint access tokens with the dev private key (load tests, demos).
    Token {
        /// First user id.
        #[arg(long, default_value_t = 1)]
        user_id: u64,
        /// How many consecutive user ids, one token per line.
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Rebuild a sale's Redis state from MySQL (after Redis lost it, or on
    /// suspected drift): pauses admission, waits for the sale's admissions
    /// in flight to settle, rebuilds stock and buyer markers, reopens.
    /// Prints JSON.
    Reconcile {
        #[arg(long)]
        sale: u64,
        /// Give up (the sale stays paused; run again) after this long.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        max_wait: Duration,
    },
    /// Check SPEC invariants 1, 2 and 4 of a sale across MySQL, Redis and
    /// RabbitMQ (and 7, money, with --payments, across the order and the
    /// wallet databases); prints JSON and exits 1 on any violation.
    Audit {
        #[arg(long, required_unless_present = "payments")]
        sale: Option<u64>,
        /// Also check payments: money conserved, one debit per paid order,
        /// none kept by an unpaid or closed one, nothing left open.
        #[arg(long)]
        payments: bool,
        /// How long to wait for in-flight admissions to settle first.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        wait: Duration,
    },
    /// The main job end to end: simulated buyers go through the gateway
    /// (captcha, hidden path, seckill, result polling) with a progress bar,
    /// then the summary and the audit. Exits 1 when the audit fails or an
    /// admitted buyer never got a result.
    Demo(DemoArgs),
    /// Roll rules bundles out to every gateway (gateway.bundles.enabled).
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Create and inspect sales.
    Sale {
        #[command(subcommand)]
        command: SaleCommand,
    },
    /// Buyers' wallets (through the wallet service's admin route).
    Wallet {
        #[command(subcommand)]
        command: WalletCommand,
    },
}

#[derive(Subcommand)]
enum WalletCommand {
    /// Top up a buyer's wallet. Prints the wallet as JSON.
    Credit {
        #[arg(long)]
        user: u64,
        #[arg(long)]
        cents: i64,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate DIR, store it as the next bundle, stage it on every live
    /// gateway and switch only when all accepted. Prints JSON; exit 1 with
    /// each gateway's errors when refused.
    Push {
        dir: PathBuf,
        /// The gateway binary that validates the folder (default: next to
        /// seckillctl, else on PATH).
        #[arg(long)]
        gateway_bin: Option<PathBuf>,
        /// Wait this long for the gateways at each step.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        timeout: Duration,
    },
    /// Every gateway's version, hash, loaded_at and last error. Prints JSON.
    Status,
    /// Return every gateway to the bundle active before this one.
    Rollback {
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        timeout: Duration,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate the dev RS256 key pair and admin token (kept if present).
    Gen {
        #[arg(long, default_value = "var/keys")]
        dir: PathBuf,
        #[arg(long, default_value = "dev-1")]
        kid: String,
        /// Replace existing keys.
        #[arg(long)]
        force: bool,
    },
    /// Add a signing key to the keyring (`jwt.keyring_dir`): published at
    /// once, signing after `jwt.publish_ahead_secs`; keys no live token
    /// can carry any more are deleted. Prints JSON.
    Rotate {
        /// The new key's id (default `k<unix seconds>`).
        #[arg(long)]
        kid: Option<String>,
    },
    /// Which keys sign and verify now. Prints JSON.
    Status,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Show parked messages (without removing them), one JSON object per line.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move parked messages back to the order queue (all, or only --id ones).
    Replay {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Message ids to replay; repeat the flag. Others stay parked.
        #[arg(long = "id")]
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum SaleCommand {
    /// Create a sale (goods + sale in MySQL) and warm its stock into Redis.
    Create(NewSaleArgs),
    /// Show a sale from MySQL with its Redis stock counter.
    Show { id: u64 },
    /// Re-run the warm-up of a sale (safe on a live sale: never raises stock).
    Warm { id: u64 },
}

/// `seckillctl demo`'s flags.
#[derive(clap::Args)]
struct DemoArgs {
    /// Sale to buy from; default: a fresh sale of --stock units.
    #[arg(long)]
    sale: Option<u64>,
    /// Units of the fresh sale.
    #[arg(long, default_value_t = 100, conflicts_with = "sale")]
    stock: u32,
    #[arg(long, default_value_t = 1_000)]
    buyers: u64,
    /// First simulated buyer's user id (far above real accounts).
    #[arg(long, default_value_t = 900_000_001)]
    first_user: u64,
    /// Gateway base URL; repeat it to spread the buyers over several
    /// gateways (round robin); default: http://<gateway.listen>.
    #[arg(long)]
    gateway: Vec<String>,
    /// How many of the buyers are greedy: each sends --greedy-attempts
    /// attempts at once, across the gateways.
    #[arg(long, default_value_t = 0)]
    greedy: u64,
    /// Attempts a greedy buyer sends at once.
    #[arg(long, default_value_t = 5)]
    greedy_attempts: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Give up waiting for results after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    timeout: Duration,
    /// How many buyers with an order pay for it (their wallets topped up
    /// first through the wallet's admin route); 0 without a wallet service.
    #[arg(long, default_value_t = 10)]
    pay: u64,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
    /// Print the report as JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

/// `seckillctl sale create`'s flags.
#[derive(clap::Args)]
struct NewSaleArgs {
    #[arg(long)]
    title: String,
    /// Regular price, in cents.
    #[arg(long)]
    price_cents: i64,
    /// Flash-sale price, in cents.
    #[arg(long)]
    sale_price_cents: i64,
    #[arg(long)]
    stock: u32,
    /// RFC 3339 start time; default: now + --starts-in.
    #[arg(long, conflicts_with = "starts_in")]
    starts_at: Option<DateTime<Utc>>,
    /// Start after this long, e.g. `30s`, `5m` (default `0s`: now).
    #[arg(long, value_parser = humantime::parse_duration)]
    starts_in: Option<Duration>,
    /// How long the sale runs, e.g. `1h`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    duration: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config.load()?;
    telemetry::init_logging(&config.log);
    let Some(command) = args.command else {
        bail!("no subcommand given; see `seckillctl --help`");
    };
    match command {
        Command::Migrate => {
            connections::migrate(&config.database).await?;
            println!("{}", json!({"migrated": true}));
        }
        Command::Keys {
            command: KeysCommand::Gen { dir, kid, force },
        } => {
            let out = signing_keys::generate(&dir, &kid, force)?;
            println!(
                "{}",
                json!({
                    "created": out.created,
                    "private_key": out.private_key,
                    "public_key": out.public_key,
                    "admin_token": out.admin_token,
                    "service_token": out.service_token,
                })
            );
        }
        Command::Keys {
            command: KeysCommand::Rotate { kid },
        } => {
            let rotation = keyring::rotate(&config.jwt, kid.as_deref(), unix_secs())?;
            println!("{}", serde_json::to_string(&rotation)?);
        }
        Command::Keys {
            command: KeysCommand::Status,
        } => println!("{}", keys_status(&config.jwt)?),
        Command::Dlq { command } => dlq_command(&config, command).await?,
        Command::Token { user_id, count } => {
            let signer = keyring::current_signer(&config.jwt, unix_secs())?;
            let tokens = (user_id..user_id.saturating_add(count))
                .map(|uid| signer.issue(uid, &format!("user{uid}")));
            print_lines(tokens)?;
        }
        Command::Reconcile { sale, max_wait } => {
            let (db, mut redis) = stores(&config).await?;
            let opts = reconcile::ReconcileOptions {
                max_wait,
                ..reconcile::ReconcileOptions::default()
            };
            let report = reconcile::reconcile(&config, &db, &mut redis, sale, opts).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Audit {
            sale,
            payments,
            wait,
        } => audit_command(&config, sale, payments, wait).await?,
        Command::Wallet {
            command: WalletCommand::Credit { user, cents },
        } => {
            let token = read_secret(
                "api.admin_token",
                config.api.admin_token.as_deref(),
                config.api.admin_token_path.as_deref(),
            )?;
            let wallet = WalletClient::new(&config)
                .credit(&token, user, cents)
                .await?;
            println!("{}", serde_json::to_string_pretty(&wallet)?);
        }
        Command::Demo(demo_args) => demo_command(&config, demo_args).await?,
        Command::Sale { command } => sale_command(&config, command).await?,
        Command::Rules { command } => rules_command(&config, &args.config, command).await?,
    }
    Ok(())
}

/// `audit`: the sale's report, with a `payments` section when asked (or
/// the payments report alone); exits 1 on any violation.
async fn audit_command(
    config: &Config,
    sale: Option<u64>,
    payments: bool,
    wait: Duration,
) -> anyhow::Result<()> {
    let (db, mut redis) = stores(config).await?;
    let mut ok = true;
    let mut out = json!({});
    if let Some(sale) = sale {
        let report = audit::run(config, &db, &mut redis, sale, wait).await?;
        ok &= report.ok;
        out = serde_json::to_value(&report)?;
    }
    if payments {
        let report = payments_audit::run(&db, &WalletClient::new(config), wait).await?;
        ok &= report.ok;
        let section = serde_json::to_value(&report)?;
        match sale {
            Some(_) => {
                out["payments"] = section;
                out["ok"] = json!(ok);
            }
            None => out = section,
        }
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

async fn rules_command(
    config: &Config,
    config_args: &ConfigArgs,
    command: RulesCommand,
) -> anyhow::Result<()> {
    let mut redis = connections::redis(config).await?;
    let keys = KeySchema::new(config.redis.key_prefix.clone());
    let outcome = match command {
        RulesCommand::Status => {
            println!("{}", rules_rollout::status(&mut redis, &keys).await?);
            return Ok(());
        }
        RulesCommand::Push {
            dir,
            gateway_bin,
            timeout,
        } => {
            let opts = rules_rollout::RolloutOptions {
                gateway_bin: gateway_bin.unwrap_or_else(default_gateway_bin),
                config_path: config_args.config.clone(),
                timeout,
            };
            rules_rollout::push(&mut redis, &keys, &dir, &opts).await
        }
        RulesCommand::Rollback { timeout } => {
            rules_rollout::rollback(&mut redis, &keys, timeout).await
        }
    };
    match outcome {
        Ok(rollout) => println!("{}", serde_json::to_string(&rollout)?),
        Err(rules_rollout::RolloutError::Refused { version, refusals }) => {
            println!("{}", json!({"refused": version, "refusals": refusals}));
            std::process::exit(1);
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// `seckill-gateway` next to this binary, else whatever PATH finds.
fn default_gateway_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("seckill-gateway"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("seckill-gateway"))
}

async fn stores(config: &Config) -> anyhow::Result<(sqlx::MySqlPool, RedisConn)> {
    Ok((
        connections::mysql(&config.database).await?,
        connections::redis(config).await?,
    ))
}

/// One line per item on stdout, written in one go.
fn print_lines<T: std::fmt::Display, E: Into<anyhow::Error>>(
    items: impl IntoIterator<Item = Result<T, E>>,
) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for item in items {
        writeln!(out, "{}", item.map_err(Into::into)?)?;
    }
    out.flush()?;
    Ok(())
}

async fn dlq_command(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    let entries = match command {
        DlqCommand::List { limit } => dlq::list(config, limit).await?,
        DlqCommand::Replay { limit, ids } => {
            let only = (!ids.is_empty()).then_some(ids.as_slice());
            dlq::replay(config, limit, only).await?
        }
    };
    print_lines(entries.iter().map(serde_json::to_string))
}

async fn demo_command(config: &Config, a: DemoArgs) -> anyhow::Result<()> {
    let (db, mut redis) = stores(config).await?;
    let defaults = demo::DemoOptions::new(config);
    let opts = demo::DemoOptions {
        sale: a.sale,
        stock: a.stock,
        buyers: a.buyers,
        first_user: a.first_user,
        gateways: if a.gateway.is_empty() {
            defaults.gateways.clone()
        } else {
            a.gateway
        },
        greedy: a.greedy,
        greedy_attempts: a.greedy_attempts,
        concurrency: a.concurrency,
        timeout: a.timeout,
        pay: a.pay,
        progress: !a.no_progress,
        ..defaults
    };
    let report = demo::run(config, &db, &mut redis, &opts).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", demo::summary(&report));
    }
    if !report.ok {
        std::process::exit(1);
    }
    Ok(())
}

async fn sale_command(config: &Config, command: SaleCommand) -> anyhow::Result<()> {
    let (db, mut redis) = stores(config).await?;
    let keys = KeySchema::new(config.redis.key_prefix.clone());
    match command {
        SaleCommand::Create(a) => {
            let starts_at = a
                .starts_at
                .unwrap_or_else(|| Utc::now() + a.starts_in.unwrap_or_default());
            let ends_at =
                starts_at + chrono::Duration::from_std(a.duration).context("duration too large")?;
            let new = NewSale {
                title: a.title,
                price_cents: a.price_cents,
                sale_price_cents: a.sale_price_cents,
                stock: a.stock,
                starts_at,
                ends_at,
            };
            let sale = sales::create(&db, &mut redis, &keys, &new).await?;
            println!("{}", serde_json::to_string(&sale)?);
        }
        SaleCommand::Show { id } => {
            let Some(sale) = sales::get(&db, id).await? else {
                bail!("no sale with id {id}");
            };
            let redis_stock = sales::redis_stock(&mut redis, &keys, id).await?;
            let mut value = serde_json::to_value(&sale)?;
            value["redis_stock"] = json!(redis_stock);
            println!("{value}");
        }
        SaleCommand::Warm { id } => {
            let Some(sale) = sales::get(&db, id).await? else {
                bail!("no sale with id {id}");
            };
            let stock = sales::warm(&mut redis, &keys, &sale).await?;
            println!("{}", json!({"sale_id": id, "redis_stock": stock}));
        }
    }
    Ok(())
}

/// `keys status`: the keyring's view now, plus the keys the config names.
fn keys_status(config: &seckill_contracts::config::JwtConfig) -> anyhow::Result<Value> {
    let now = unix_secs();
    let configured: Vec<&str> = config.public_keys.iter().map(|k| k.kid.as_str()).collect();
    let Some(dir) = &config.keyring_dir else {
        return Ok(json!({"keyring": null, "configured": configured, "signs": config.signing_kid}));
    };
    let manifest = keyring::Manifest::read(dir)?;
    let lifetime = config.ttl_secs.saturating_add(config.leeway_secs);
    let in_force = manifest.in_force(now, lifetime);
    let signs = in_force
        .signer
        .map_or(config.signing_kid.as_str(), |e| e.kid.as_str());
    Ok(json!({
        "keyring": dir,
        "configured": configured,
        "signs": signs,
        "verifying": in_force.verifying,
        "retired": in_force.retired,
        "now": now,
    }))
}

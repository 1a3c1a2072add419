//! Buyers for the load: one RS256 token per user (minted with the dev
//! private key, cached on disk because 20,000 RSA signatures take a while)
//! and one pre-issued hidden path per user and sale, written to Redis the
//! way the api issues them. The result is a file of `token path` lines that
//! `bench/wrk/seckill.lua` rotates through.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::RngCore;
use seckill_contracts::config::Config;
use seckill_contracts::keys::KeySchema;
use seckill_workers::keyring;

/// Tokens younger than this are reused (they live `jwt.ttl_secs`).
const TOKEN_REUSE_SECS: u64 = 3600;
/// Bench paths live long enough for every scenario of one run.
const PATH_TTL_SECS: u64 = 3600;

/// Tokens for users `1..=n`, from the cache in `dir` when fresh: younger
/// than [`TOKEN_REUSE_SECS`] and than the signing key (a key made again,
/// as `scripts/cluster` does after `down`, would not verify old tokens).
pub fn tokens(config: &Config, dir: &Path, n: u64) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let cache = dir.join(format!("tokens-{n}.txt"));
    let key_made = std::fs::metadata(&config.jwt.private_key_path)
        .and_then(|m| m.modified())
        .ok();
    if let Ok(meta) = std::fs::metadata(&cache) {
        let made = meta.modified().ok();
        let fresh = made
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age.as_secs() < TOKEN_REUSE_SECS)
            && made >= key_made;
        if fresh {
            let lines: Vec<String> = std::fs::read_to_string(&cache)?
                .lines()
                .map(str::to_string)
                .collect();
            if lines.len() as u64 == n {
                return Ok(lines);
            }
        }
    }
    let signer = keyring::current_signer(&config.jwt, seckill_contracts::clock::unix_secs())
        .context("loading the signing key")?;
    let threads = std::thread::available_parallelism().map_or(2, |p| p.get()) as u64;
    let per = n.div_ceil(threads);
    let chunks: Vec<anyhow::Result<Vec<String>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let signer = &signer;
                s.spawn(move || {
                    let from = 1 + t * per;
                    let to = (from + per - 1).min(n);
                    (from..=to)
                        .map(|u| Ok(signer.issue(u, &format!("bench{u}"))?))
                        .collect::<anyhow::Result<Vec<String>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("minting thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(n as usize);
    for c in chunks {
        all.extend(c?);
    }
    std::fs::write(&cache, all.join("\n") + "\n")?;
    Ok(all)
}

/// Issues a fresh hidden path for every user of `tokens` in sale `sale_id`
/// and writes the wrk data file; returns its path.
pub async fn issue_paths<C: redis::aio::ConnectionLike>(
    redis: &mut C,
    keys: &KeySchema,
    sale_id: u64,
    tokens: &[String],
    out: &Path,
) -> anyhow::Result<PathBuf> {
    let sale = keys.sale(sale_id);
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut rng = rand::rng();
    for (chunk_no, chunk) in tokens.chunks(1000).enumerate() {
        let mut pipe = redis::pipe();
        for (i, token) in chunk.iter().enumerate() {
            let user = (chunk_no * 1000 + i + 1) as u64;
            let mut bytes = [0u8; 16];
            rng.fill_bytes(&mut bytes);
            let path = hex::encode(bytes);
            pipe.cmd("SET")
                .arg(sale.path(user))
                .arg(&path)
                .arg("EX")
                .arg(PATH_TTL_SECS)
                .ignore();
            writeln!(file, "{token} {path}")?;
        }
        let _: () = pipe.query_async(redis).await?;
    }
    file.flush()?;
    Ok(out.to_path_buf())
}

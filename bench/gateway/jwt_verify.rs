//! Cold JWT verification at the edge: what a buyer's *first* request costs
//! the gateway (the verified-token cache is off, every token is new), as at
//! the start of a sale when every buyer arrives with a fresh token.
//!
//! ```text
//! cargo bench -p seckill-gateway --bench jwt_verify
//! BENCH_TOKENS=20000 BENCH_RUNS=5 cargo bench -p seckill-gateway --bench jwt_verify
//! ```
//!
//! Prints verifications per second on one thread for each run and the
//! median.

use std::time::Instant;

use seckill_contracts::testkit::TestKeys;
use seckill_gateway::jwt::JwtVerifier;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("jwt_verify: run with `cargo bench -p seckill-gateway --bench jwt_verify`");
        return;
    }
    let n = env_usize("BENCH_TOKENS", 5_000);
    let runs = env_usize("BENCH_RUNS", 5);
    let keys = TestKeys::generate("bench-1");
    let (iss, aud) = ("bench-issuer", "bench-audience");
    let tokens: Vec<String> = (1..=n as u64)
        .map(|u| keys.mint(&TestKeys::claims_for(u, iss, aud, 3600)))
        .collect();
    let verifier = JwtVerifier::new(
        &[(keys.kid.clone(), keys.public_pem.clone().into_bytes())],
        iss,
        aud,
        5,
        0, // no cache: every verification is a cold one
    )
    .expect("verifier");
    let mut rates = Vec::with_capacity(runs);
    for run in 1..=runs {
        let start = Instant::now();
        for t in &tokens {
            verifier.verify(t).expect("a valid token verifies");
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        println!("run {run}: {rate:.0} cold verifications/s ({n} tokens, one thread)");
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!("median: {:.0} cold verifications/s", rates[rates.len() / 2]);
}

//! The OpenResty peer of the benchmarks (`bench/peers/openresty/`) answers
//! the seckill route exactly as the gateway does: the same 20 requests
//! (forged, expired and HS256 tokens, unknown kid, bad ids and paths, not
//! started, ended, bad path, admitted, duplicate, limited, sold out) sent to
//! the real gateway and to the peer on the same Redis, compared field by
//! field by `bench/peers/openresty/parity.py`. A comparison of speed is only
//! fair between two programs that do the same thing.

mod support;

use std::time::Duration;

use seckill_contracts::testkit::free_addr;
use support::python_tools::run_tool;
use support::stack::{repo_root, Stack, StackOptions};

/// The peer, stopped when dropped.
struct Peer {
    var: tempfile::TempDir,
    url: String,
}

impl Peer {
    fn start(config: &std::path::Path) -> Peer {
        let var = tempfile::tempdir().unwrap();
        let port = free_addr().port();
        let out = std::process::Command::new(repo_root().join("bench/peers/openresty/run"))
            .current_dir(repo_root())
            .args(["start", "--port", &port.to_string(), "--var"])
            .arg(var.path())
            .arg("--config")
            .arg(config)
            .output()
            .expect("running bench/peers/openresty/run");
        assert!(
            out.status.success(),
            "the peer did not start:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Peer {
            var,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo_root().join("bench/peers/openresty/run"))
            .arg("stop")
            .arg("--var")
            .arg(self.var.path())
            .status();
    }
}

#[tokio::test]
async fn the_peer_answers_the_same_20_requests_as_the_gateway() {
    // No worker: the script's sales live only in Redis, so a worker would
    // settle the gateway's admitted orders as failed (unknown sale) and give
    // their units back in the middle of the comparison.
    let stack = Stack::start(StackOptions {
        worker: false,
        gateway_amqp_url: None,
        gateway_redis_url: None,
        payment_mode: None,
    })
    .await;
    let config = stack.config_path.clone();
    let peer = tokio::task::spawn_blocking(move || Peer::start(&config))
        .await
        .unwrap();
    let script = repo_root()
        .join("bench/peers/openresty/parity.py")
        .to_string_lossy()
        .into_owned();
    let args = vec![
        script,
        "--gateway".into(),
        stack.url(""),
        "--peer".into(),
        peer.url.clone(),
        "--config".into(),
        stack.config_path.to_string_lossy().into_owned(),
    ];
    let (ok, output) = run_tool("python", &args, &[], Duration::from_secs(120)).await;
    println!("{output}");
    assert!(
        ok,
        "the peer and the gateway answered differently:\n{output}"
    );
    assert!(output.contains("20/20 equal"), "{output}");
    drop(peer);
    stack.cleanup().await;
}

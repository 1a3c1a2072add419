//! The Python tools some end-to-end tests drive (schemathesis, a
//! generated client, Playwright): a venv made once per test process by
//! `scripts/lib/api_contract_tools.sh` from the pinned
//! `scripts/api-contract/requirements.txt`, and for the browser tests
//! Debian's chromium (`scripts/lib/browser_tools.sh`). scripts/test
//! prepares both first; a test run alone prepares what is missing.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::stack::repo_root;

/// The venv with schemathesis and openapi-python-client, made once per
/// test process by `scripts/lib/api_contract_tools.sh`.
pub fn api_tools() -> &'static PathBuf {
    static TOOLS: OnceLock<PathBuf> = OnceLock::new();
    TOOLS.get_or_init(|| {
        PathBuf::from(prepare(
            "the Python tools",
            "source scripts/lib/api_contract_tools.sh && ensure_api_contract_tools \
             && echo \"$SECKILL_API_TOOLS\"",
        ))
    })
}

/// A file of `scripts/api-contract/`.
pub fn contract_file(name: &str) -> String {
    repo_root()
        .join("scripts/api-contract")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Runs `program` from the venv's `bin/` with the venv first on PATH, in a
/// scratch folder (hypothesis leaves its state in the working directory),
/// killed after `timeout`, with `env` added. Returns (success, stdout and
/// stderr).
pub async fn run_tool(
    program: &str,
    args: &[String],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (bool, String) {
    let scratch = tempfile::tempdir().unwrap();
    // Making the venv may take half a minute: off the async workers.
    let venv = tokio::task::spawn_blocking(|| api_tools().clone())
        .await
        .unwrap();
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = tokio::process::Command::new(venv.join("bin").join(program))
        .args(args)
        .current_dir(scratch.path())
        .env("PATH", path)
        .env("VIRTUAL_ENV", &venv)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, child)
        .await
        .unwrap_or_else(|_| panic!("{program} ran longer than {timeout:?}"))
        .expect("running the tool");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `script` with `bash` after sourcing the tools libraries; panics
/// with its stderr when it fails. Returns its stdout, trimmed.
fn prepare(what: &str, script: &str) -> String {
    let out = Command::new("bash")
        .current_dir(repo_root())
        .args(["-c", script])
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "could not prepare {what}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The path of Debian's chromium, installed when missing.
pub fn chromium() -> &'static PathBuf {
    static CHROMIUM: OnceLock<PathBuf> = OnceLock::new();
    CHROMIUM.get_or_init(|| {
        PathBuf::from(prepare(
            "chromium",
            "source scripts/lib/browser_tools.sh && ensure_chromium && echo \"$SECKILL_CHROMIUM\"",
        ))
    })
}

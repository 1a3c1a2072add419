//! The sandbox through the real gateway: each escape attempt or runaway rule
//! is a 500 for its own request only; other requests meanwhile succeed.

mod support;

use std::time::Duration;

use seckill_contracts::config::RouteConfig;
use seckill_contracts::testkit::TestEnv;
use support::{write_rules, GatewayProc};

const RULES: &str = r#"
local attacks = {
  os = function() return os.execute("touch /tmp/seckill-sandbox-escaped") end,
  io = function() return io.open("/etc/passwd"):read("*a") end,
  bytecode = function() return load(string.dump(function() end)) end,
  loadstring = function() return loadstring("return 1")() end,
  require = function() return require("../../etc/passwd") end,
  debug = function() return debug.getinfo(1) end,
  loop = function() while true do end end,
  memory = function()
    local t = {}
    for i = 1, 1e9 do t[i] = string.rep("x", 4096) .. i end
  end,
  error = function() error("rule bug") end,
  badreturn = function() return 42 end,
}
return {
  access = function(req)
    local attack = attacks[req.params.what]
    if attack then return attack() end
    return seckill.respond(200, { ok = true })
  end,
}
"#;

#[tokio::test]
async fn escapes_and_runaways_are_confined_to_their_request() {
    let env = TestEnv::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lua");
    write_rules(&dir, RULES, &[]);
    let mut config = GatewayProc::config(&env, &[], &dir);
    config.gateway.pools.clear();
    config.gateway.lua_instruction_budget = 2_000_000;
    config.gateway.lua_memory_bytes = 64 * 1024 * 1024;
    config.gateway.routes = vec![RouteConfig {
        public: true,
        ..RouteConfig::local("probe", "GET", "/probe/{what}")
    }];
    let gw = GatewayProc::start(config).await;
    let client = reqwest::Client::new();
    let _ = std::fs::remove_file("/tmp/seckill-sandbox-escaped");

    for what in [
        "os",
        "io",
        "bytecode",
        "loadstring",
        "require",
        "debug",
        "loop",
        "memory",
        "error",
        "badreturn",
    ] {
        // Healthy traffic runs alongside each bad request.
        let url = gw.url("/probe/fine");
        let background = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut ok = 0;
            for _ in 0..20 {
                if client
                    .get(&url)
                    .send()
                    .await
                    .map(|r| r.status() == 200)
                    .unwrap_or(false)
                {
                    ok += 1;
                }
            }
            ok
        });
        let r = client
            .get(gw.url(&format!("/probe/{what}")))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500, "{what}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{what}"
        );
        assert_eq!(
            background.await.unwrap(),
            20,
            "healthy requests failed during {what}"
        );
    }
    assert!(
        !std::path::Path::new("/tmp/seckill-sandbox-escaped").exists(),
        "os.execute ran"
    );
    let metrics = gw.metrics().await;
    assert!(metrics.contains("kind=\"budget\""), "{metrics}");
    let ok = client.get(gw.url("/probe/fine")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

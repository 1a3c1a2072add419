//! The api service against the real MariaDB and Redis: served in-process on
//! an ephemeral port through `api::serve`, each test with its own database
//! and key prefix (`TestEnv`) and a test RS256 key pair.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::Utc;
use redis::AsyncCommands;
use reqwest::StatusCode;
use seckill_contracts::claims::AccessClaims;
use seckill_contracts::config::PublicKeyConfig;
use seckill_contracts::testkit::{TestEnv, TestKeys};
use seckill_workers::api::{self, ApiState};
use seckill_workers::sales::{self, NewSale, Sale};
use serde_json::{json, Value};

const ADMIN: &str = "test-admin-token-0123456789";

fn test_keys() -> &'static TestKeys {
    static KEYS: OnceLock<TestKeys> = OnceLock::new();
    KEYS.get_or_init(|| TestKeys::generate("api-test-1"))
}

struct Api {
    env: TestEnv,
    state: ApiState,
    config: seckill_contracts::Config,
    base: String,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start() -> Api {
        Api::start_with(|_| {}).await
    }

    /// [`Api::start`] with the test's own changes to the config.
    async fn start_with(tweak: impl FnOnce(&mut seckill_contracts::Config)) -> Api {
        let env = TestEnv::new().await;
        let dir = tempfile::tempdir().unwrap();
        let keys = test_keys();
        let private = dir.path().join("private.pem");
        std::fs::write(&private, &keys.private_pem).unwrap();
        let public = keys.write_public(dir.path());
        let mut config = env.config.clone();
        config.jwt.signing_kid = keys.kid.clone();
        config.jwt.private_key_path = private;
        config.jwt.public_keys = vec![PublicKeyConfig {
            kid: keys.kid.clone(),
            path: public,
        }];
        config.api.admin_token = Some(ADMIN.into());
        config.api.admin_token_path = None;
        tweak(&mut config);
        let state = ApiState::connect(&config).await.expect("api state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(api::serve(state.clone(), listener, async {
            let _ = rx.await;
        }));
        Api {
            env,
            state,
            config,
            base,
            http: reqwest::Client::new(),
            stop: Some(tx),
            server: Some(server),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn issuer(&self) -> (&str, &str) {
        (&self.env.config.jwt.issuer, &self.env.config.jwt.audience)
    }

    fn token(&self, user_id: u64) -> String {
        let (iss, aud) = self.issuer();
        test_keys().mint(&TestKeys::claims_for(user_id, iss, aud, 600))
    }

    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        self.env.redis().await
    }

    async fn sale(&self, stock: u32, starts_in_secs: i64, lasts_secs: i64) -> Sale {
        let db = self.env.db().await;
        let mut redis = self.redis().await;
        let starts_at = Utc::now() + chrono::Duration::seconds(starts_in_secs);
        sales::create(
            &db,
            &mut redis,
            &self.env.keys(),
            &NewSale {
                title: "Phone".into(),
                price_cents: 99_900,
                sale_price_cents: 19_900,
                stock,
                starts_at,
                ends_at: starts_at + chrono::Duration::seconds(lasts_secs),
            },
        )
        .await
        .expect("create sale")
    }

    async fn active_sale(&self) -> Sale {
        self.sale(10, -60, 3600).await
    }

    async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn get_auth(&self, path: &str, user: u64) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(self.token(user))
            .send()
            .await
            .unwrap()
    }

    async fn post_auth(&self, path: &str, user: u64, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(self.token(user))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        }
        let Api { env, .. } = self;
        env.cleanup().await;
    }
}

/// Asserts an RFC 9457 problem with `status` and returns its body.
async fn problem(resp: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(resp.status(), status);
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert_eq!(ct, "application/problem+json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    for field in ["type", "title", "detail"] {
        assert!(body[field].is_string(), "{field} in {body}");
    }
    body
}

async fn user_count(api: &Api) -> i64 {
    let db = api.env.db().await;
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM users")
        .fetch_one(&db)
        .await
        .unwrap();
    n
}

#[tokio::test]
async fn register_login_and_bad_input() {
    let api = Api::start().await;
    let creds = json!({"username": "alice_1", "password": "correct horse"});
    let resp = api.post_json("/api/v1/auth/register", creds.clone()).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let user_id = resp.json::<Value>().await.unwrap()["user_id"]
        .as_u64()
        .unwrap();
    assert!(user_id > 0);

    let dup = api.post_json("/api/v1/auth/register", creds.clone()).await;
    problem(dup, StatusCode::CONFLICT).await;

    // Bad input: 400 problem and nothing changes.
    let before = user_count(&api).await;
    for body in [
        json!({"username": "a'; DROP TABLE users;--", "password": "longenough"}),
        json!({"username": "ab", "password": "longenough"}),
        json!({"username": "bob_12", "password": "short"}),
        json!({"username": "bob_12"}),
        json!({"password": "longenough"}),
        json!({"username": 5, "password": "longenough"}),
        json!([1, 2]),
    ] {
        let resp = api.post_json("/api/v1/auth/register", body.clone()).await;
        problem(resp, StatusCode::BAD_REQUEST).await;
    }
    let malformed = api
        .http
        .post(api.url("/api/v1/auth/register"))
        .header("content-type", "application/json")
        .body("{\"username\": \"bob\",")
        .send()
        .await
        .unwrap();
    problem(malformed, StatusCode::BAD_REQUEST).await;
    let wrong_type = api
        .http
        .post(api.url("/api/v1/auth/register"))
        .header("content-type", "text/plain")
        .body(creds.to_string())
        .send()
        .await
        .unwrap();
    assert!(problem(wrong_type, StatusCode::UNSUPPORTED_MEDIA_TYPE)
        .await
        .is_object());
    let huge = api
        .http
        .post(api.url("/api/v1/auth/register"))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"username\":\"bob_12\",\"password\":\"{}\"}}",
            "x".repeat(200_000)
        ))
        .send()
        .await
        .unwrap();
    problem(huge, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(user_count(&api).await, before);
    let db = api.env.db().await;
    let (tables,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'users'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(tables, 1, "users table still there");

    // Login.
    let resp = api.post_json("/api/v1/auth/login", creds.clone()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["user_id"], user_id);
    assert_eq!(body["expires_in"], api.env.config.jwt.ttl_secs);
    let token = body["access_token"].as_str().unwrap().to_string();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    assert_eq!(header.kid.as_deref(), Some(test_keys().kid.as_str()));
    // The issued token works on an authenticated route.
    let resp = api
        .http
        .get(api.url("/api/v1/idempotency-key"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Wrong password and unknown user: the same 401.
    let wrong = api
        .post_json(
            "/api/v1/auth/login",
            json!({"username": "alice_1", "password": "wrong password"}),
        )
        .await;
    let a = problem(wrong, StatusCode::UNAUTHORIZED).await;
    let unknown = api
        .post_json(
            "/api/v1/auth/login",
            json!({"username": "nobody_here", "password": "correct horse"}),
        )
        .await;
    let b = problem(unknown, StatusCode::UNAUTHORIZED).await;
    assert_eq!(a, b, "unknown user and wrong password look the same");
    // ...and take about as long: an unknown user is verified against a
    // dummy argon2id hash, not answered at once. Loose bounds: tests run in
    // parallel on a small machine.
    let time = |username: &'static str| {
        let api = &api;
        async move {
            let start = std::time::Instant::now();
            let resp = api
                .post_json(
                    "/api/v1/auth/login",
                    json!({"username": username, "password": "wrong password"}),
                )
                .await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
            start.elapsed()
        }
    };
    let known = time("alice_1").await;
    let unknown = time("nobody_here").await;
    assert!(
        unknown * 4 >= known && known * 4 >= unknown,
        "known {known:?} vs unknown {unknown:?}"
    );
    let bad = api
        .post_json("/api/v1/auth/login", json!({"username": "x"}))
        .await;
    problem(bad, StatusCode::BAD_REQUEST).await;
    api.stop().await;
}

#[tokio::test]
async fn authenticated_routes_verify_the_token_themselves() {
    let api = Api::start().await;
    let (iss, aud) = api.issuer();
    let (iss, aud) = (iss.to_string(), aud.to_string());
    let route = api.url("/api/v1/idempotency-key");

    // A forged X-User-Id and no token.
    let forged = api
        .http
        .get(&route)
        .header("x-user-id", "1")
        .send()
        .await
        .unwrap();
    let www = forged.headers().get("www-authenticate").cloned();
    problem(forged, StatusCode::UNAUTHORIZED).await;
    assert!(www.unwrap().to_str().unwrap().starts_with("Bearer"));

    let expired = test_keys().mint(&TestKeys::claims_for(1, &iss, &aud, -60));
    let mut wrong_iss = TestKeys::claims_for(1, "someone", &aud, 600);
    wrong_iss.aud = aud.clone();
    let wrong_iss = test_keys().mint(&wrong_iss);
    let wrong_aud = test_keys().mint(&TestKeys::claims_for(1, &iss, "other", 600));
    let bad_sub = test_keys().mint(&AccessClaims {
        sub: "0".into(),
        ..TestKeys::claims_for(1, &iss, &aud, 600)
    });
    // HS256 with the public key as secret: the classic confusion attack.
    let mut hs_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs_header.kid = Some(test_keys().kid.clone());
    let hs = jsonwebtoken::encode(
        &hs_header,
        &TestKeys::claims_for(1, &iss, &aud, 600),
        &jsonwebtoken::EncodingKey::from_secret(test_keys().public_pem.as_bytes()),
    )
    .unwrap();
    // Same kid, different private key: bad signature.
    let stranger = TestKeys::generate("api-test-1");
    let forged_sig = stranger.mint(&TestKeys::claims_for(1, &iss, &aud, 600));
    for (name, value) in [
        ("expired", format!("Bearer {expired}")),
        ("wrong iss", format!("Bearer {wrong_iss}")),
        ("wrong aud", format!("Bearer {wrong_aud}")),
        ("bad sub", format!("Bearer {bad_sub}")),
        ("hs256", format!("Bearer {hs}")),
        ("forged signature", format!("Bearer {forged_sig}")),
        ("garbage", "Bearer a.b.c".into()),
        ("basic", "Basic dXNlcjpwdw==".into()),
        ("empty", "Bearer ".into()),
    ] {
        let resp = api
            .http
            .get(&route)
            .header("authorization", value)
            .header("x-user-id", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{name}");
        assert!(resp.headers().contains_key("www-authenticate"), "{name}");
        problem(resp, StatusCode::UNAUTHORIZED).await;
    }

    // A valid token for user 7 with X-User-Id claiming user 8: identity is 7.
    let resp = api
        .http
        .get(&route)
        .bearer_auth(api.token(7))
        .header("x-user-id", "8")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-request-id"));
    let body: Value = resp.json().await.unwrap();
    let key = body["key"].as_str().unwrap();
    assert_eq!(key.len(), 32);
    let mut redis = api.redis().await;
    let stored: Option<String> = redis.get(api.env.keys().idempotency(7, key)).await.unwrap();
    assert_eq!(stored.as_deref(), Some("issued"));
    let ttl: i64 = redis.ttl(api.env.keys().idempotency(7, key)).await.unwrap();
    assert!(ttl > 0 && ttl <= api.env.config.api.idempotency_key_ttl_secs as i64);
    assert_eq!(
        body["expires_in"],
        api.env.config.api.idempotency_key_ttl_secs
    );
    let other: Option<String> = redis.get(api.env.keys().idempotency(8, key)).await.unwrap();
    assert_eq!(other, None);

    // Unknown routes and methods are problems too; the request id is echoed.
    let resp = api
        .http
        .get(api.url("/api/v1/nope"))
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "req-123");
    problem(resp, StatusCode::NOT_FOUND).await;
    let resp = api
        .http
        .delete(api.url("/api/v1/sales"))
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::METHOD_NOT_ALLOWED).await;
    api.stop().await;
}

#[tokio::test]
async fn sales_list_detail_statuses_and_cache() {
    let api = Api::start().await;
    let upcoming = api.sale(5, 3600, 3600).await;
    let active = api.active_sale().await;
    let sold_out = api.active_sale().await;
    let ended = api.sale(5, -7200, 3600).await;
    let mut redis = api.redis().await;
    let _: () = redis
        .set(api.env.keys().sale(sold_out.id).stock(), 0)
        .await
        .unwrap();
    let _: () = redis
        .set(api.env.keys().sale(active.id).stock(), 7)
        .await
        .unwrap();

    let list: Vec<Value> = api
        .http
        .get(api.url("/api/v1/sales"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let status_of = |id: u64| {
        list.iter()
            .find(|s| s["id"] == id)
            .map(|s| s["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status_of(upcoming.id).as_deref(), Some("upcoming"));
    assert_eq!(status_of(active.id).as_deref(), Some("active"));
    assert_eq!(status_of(sold_out.id).as_deref(), Some("sold_out"));
    assert_eq!(status_of(ended.id).as_deref(), Some("ended"));

    let resp = api
        .http
        .get(api.url(&format!("/api/v1/sales/{}", active.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let detail: Value = resp.json().await.unwrap();
    for field in [
        "id",
        "goods_id",
        "title",
        "price_cents",
        "sale_price_cents",
        "stock_total",
        "stock_left",
        "starts_at",
        "ends_at",
        "status",
        "server_time",
    ] {
        assert!(!detail[field].is_null(), "{field} in {detail}");
    }
    assert_eq!(detail["stock_left"], 7, "stock is the live Redis counter");
    assert_eq!(detail["stock_total"], 10);
    assert_eq!(detail["price_cents"], 99_900);
    let server_time = detail["server_time"].as_str().unwrap();
    assert!(server_time.ends_with('Z'));
    chrono::DateTime::parse_from_rfc3339(server_time).unwrap();
    chrono::DateTime::parse_from_rfc3339(detail["starts_at"].as_str().unwrap()).unwrap();

    // Stock moves without touching the cache: the next read shows it.
    let _: () = redis
        .set(api.env.keys().sale(active.id).stock(), 3)
        .await
        .unwrap();
    let detail: Value = api
        .http
        .get(api.url(&format!("/api/v1/sales/{}", active.id)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(detail["stock_left"], 3);

    // TTLs carry jitter: every entry within [ttl, ttl * 1.2], not all equal.
    let mut ttls = Vec::new();
    for s in [&upcoming, &active, &sold_out, &ended] {
        let _ = api
            .http
            .get(api.url(&format!("/api/v1/sales/{}", s.id)))
            .send()
            .await
            .unwrap();
        let pttl: i64 = redis::cmd("PTTL")
            .arg(api.env.keys().sale(s.id).cache())
            .query_async(&mut redis)
            .await
            .unwrap();
        let base = api.env.config.api.sale_cache_ttl_secs as i64 * 1000;
        assert!(pttl > base - 5_000 && pttl <= base * 6 / 5, "{pttl}");
        ttls.push(pttl);
    }
    ttls.sort_unstable();
    ttls.dedup();
    assert!(ttls.len() > 1, "jitter: {ttls:?}");

    // Unknown ids: 404, cached as null, and the second request skips MySQL.
    let unknown = active.id + 1000;
    let loads = api.state.sale_db_loads();
    let resp = api
        .http
        .get(api.url(&format!("/api/v1/sales/{unknown}")))
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::NOT_FOUND).await;
    assert_eq!(api.state.sale_db_loads(), loads + 1);
    let marker: Option<String> = redis
        .get(api.env.keys().sale(unknown).cache())
        .await
        .unwrap();
    assert_eq!(marker.as_deref(), Some("null"));
    let pttl: i64 = redis::cmd("PTTL")
        .arg(api.env.keys().sale(unknown).cache())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 12_000, "{pttl}");
    // Prove it: with the sales table gone, the cached miss still answers 404.
    let db = api.env.db().await;
    sqlx::query("RENAME TABLE sales TO sales_gone")
        .execute(&db)
        .await
        .unwrap();
    let resp = api
        .http
        .get(api.url(&format!("/api/v1/sales/{unknown}")))
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::NOT_FOUND).await;
    // And a cached sale too.
    let resp = api
        .http
        .get(api.url(&format!("/api/v1/sales/{}", active.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(api.state.sale_db_loads(), loads + 1);
    sqlx::query("RENAME TABLE sales_gone TO sales")
        .execute(&db)
        .await
        .unwrap();

    for bad in [
        "abc",
        "0",
        "-1",
        "99999999999999999999999",
        "1%27%20OR%201=1",
    ] {
        let resp = api
            .http
            .get(api.url(&format!("/api/v1/sales/{bad}")))
            .send()
            .await
            .unwrap();
        problem(resp, StatusCode::NOT_FOUND).await;
    }
    api.stop().await;
}

#[tokio::test]
async fn a_stampede_on_a_cold_sale_reads_mysql_once() {
    let api = Api::start().await;
    let sale = api.active_sale().await;
    let before = api.state.sale_db_loads();
    let url = api.url(&format!("/api/v1/sales/{}", sale.id));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let http = api.http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            http.get(&url).send().await.map(|r| r.status())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(
        api.state.sale_db_loads() - before,
        1,
        "exactly one MySQL read"
    );

    // Two api instances on a cold key: the Redis lock keeps it to one read.
    let second = ApiState::connect(&api.config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base2 = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server2 = tokio::spawn(api::serve(second.clone(), listener, async {
        let _ = rx.await;
    }));
    let cold = api.active_sale().await;
    let (a0, b0) = (api.state.sale_db_loads(), second.sale_db_loads());
    let mut tasks = Vec::new();
    for i in 0..200 {
        let http = api.http.clone();
        let base = if i % 2 == 0 {
            api.base.clone()
        } else {
            base2.clone()
        };
        let url = format!("{base}/api/v1/sales/{}", cold.id);
        tasks.push(tokio::spawn(async move {
            http.get(&url).send().await.map(|r| r.status())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), StatusCode::OK);
    }
    let loads = (api.state.sale_db_loads() - a0) + (second.sale_db_loads() - b0);
    assert_eq!(loads, 1, "one MySQL read across two instances");
    let _ = tx.send(());
    let _ = server2.await;
    api.stop().await;
}

#[tokio::test]
async fn captcha_then_hidden_path() {
    let api = Api::start().await;
    let sale = api.active_sale().await;
    let keys = api.env.keys().sale(sale.id);
    let user = 42;
    let mut redis = api.redis().await;

    // Without a token: 401. Unknown sale: 404.
    let resp = api
        .http
        .get(api.url(&format!("/api/v1/sales/{}/captcha", sale.id)))
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::UNAUTHORIZED).await;
    let resp = api
        .get_auth(&format!("/api/v1/sales/{}/captcha", sale.id + 99), user)
        .await;
    problem(resp, StatusCode::NOT_FOUND).await;

    fetch_captcha(&api, sale.id, user).await;
    let answer: String = redis.get(keys.captcha(user)).await.unwrap();
    let answer: i64 = answer.parse().unwrap();
    let ttl: i64 = redis.ttl(keys.captcha(user)).await.unwrap();
    assert!(ttl > 0 && ttl <= 300, "{ttl}");

    // Wrong answer: 400 and spent; the right answer afterwards is 400 too.
    let path_url = format!("/api/v1/sales/{}/path", sale.id);
    let resp = api
        .post_auth(&path_url, user, json!({"captcha_answer": answer + 1}))
        .await;
    problem(resp, StatusCode::BAD_REQUEST).await;
    let gone: Option<String> = redis.get(keys.captcha(user)).await.unwrap();
    assert_eq!(gone, None);
    let resp = api
        .post_auth(&path_url, user, json!({"captcha_answer": answer}))
        .await;
    problem(resp, StatusCode::BAD_REQUEST).await;
    let none: Option<String> = redis.get(keys.path(user)).await.unwrap();
    assert_eq!(none, None, "no path for a failed captcha");

    // Malformed body: 400, and the captcha is not consumed by it.
    fetch_captcha(&api, sale.id, user).await;
    let resp = api.post_auth(&path_url, user, json!({"answer": 1})).await;
    problem(resp, StatusCode::BAD_REQUEST).await;
    let answer: i64 = redis
        .get::<_, String>(keys.captcha(user))
        .await
        .unwrap()
        .parse()
        .unwrap();

    // Right answer (as a string, like a form field): 200 and the path stored.
    let resp = api
        .post_auth(
            &path_url,
            user,
            json!({"captcha_answer": answer.to_string()}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    let path = body["path"].as_str().unwrap();
    assert_eq!(path.len(), 32);
    assert!(path.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(body["expires_in"], 60);
    let stored: String = redis.get(keys.path(user)).await.unwrap();
    assert_eq!(stored, path);
    let ttl: i64 = redis.ttl(keys.path(user)).await.unwrap();
    assert!(ttl > 0 && ttl <= 60, "{ttl}");
    let spent: Option<String> = redis.get(keys.captcha(user)).await.unwrap();
    assert_eq!(spent, None);

    // A sale that is not active: 409, and no path.
    let upcoming = api.sale(5, 3600, 3600).await;
    let resp = api
        .get_auth(&format!("/api/v1/sales/{}/captcha", upcoming.id), user)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let up_keys = api.env.keys().sale(upcoming.id);
    let answer: String = redis.get(up_keys.captcha(user)).await.unwrap();
    let resp = api
        .post_auth(
            &format!("/api/v1/sales/{}/path", upcoming.id),
            user,
            json!({"captcha_answer": answer.parse::<i64>().unwrap()}),
        )
        .await;
    problem(resp, StatusCode::CONFLICT).await;
    let none: Option<String> = redis.get(up_keys.path(user)).await.unwrap();
    assert_eq!(none, None);

    api.stop().await;
}

/// A burst of logins and captchas (the opening of a sale) runs at most
/// `api.cpu_jobs` argon2 hashes and PNG renders at once; the rest queue and
/// every request still gets its answer, each captcha with its own answer.
#[tokio::test]
async fn a_login_and_captcha_burst_is_bounded_by_cpu_jobs() {
    let api = Api::start_with(|c| c.api.cpu_jobs = 2).await;
    let sale = api.active_sale().await;
    let creds = json!({"username": "burst_user", "password": "correct horse"});
    let resp = api.post_json("/api/v1/auth/register", creds.clone()).await;
    assert_eq!(resp.status(), StatusCode::CREATED);

    let logins = (0..12).map(|_| {
        let (api, creds) = (&api, creds.clone());
        async move { api.post_json("/api/v1/auth/login", creds).await.status() }
    });
    let captchas = (0..24).map(|user| {
        let api = &api;
        async move { fetch_captcha(api, sale.id, 1_000 + user).await }
    });
    let (statuses, _) = tokio::join!(
        futures::future::join_all(logins),
        futures::future::join_all(captchas)
    );
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(
        api.state.cpu().peak_running(),
        2,
        "both slots used, never more"
    );
    let mut redis = api.redis().await;
    let keys = api.env.keys().sale(sale.id);
    for user in 1_000..1_024 {
        let answer: Option<String> = redis.get(keys.captcha(user)).await.unwrap();
        assert!(answer.is_some(), "captcha answer for user {user} stored");
    }
    api.stop().await;
}

/// Fetches a captcha for `user`, checks it is a decodable PNG.
async fn fetch_captcha(api: &Api, sale_id: u64, user: u64) {
    let resp = api
        .get_auth(&format!("/api/v1/sales/{sale_id}/captcha"), user)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "image/png");
    let png = resp.bytes().await.unwrap();
    let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap();
    assert!(img.width() > 100 && img.height() > 20);
}

#[tokio::test]
async fn result_polling_covers_every_status() {
    let api = Api::start().await;
    let sale = api.active_sale().await;
    let keys = api.env.keys().sale(sale.id);
    let url = format!("/api/v1/sales/{}/result", sale.id);
    let mut redis = api.redis().await;
    let poll = |user: u64| {
        let api = &api;
        let url = url.clone();
        async move {
            let resp = api.get_auth(&url, user).await;
            assert_eq!(resp.status(), StatusCode::OK);
            resp.json::<Value>().await.unwrap()
        }
    };

    assert_eq!(poll(1).await, json!({"status": "none"}));

    let _: () = redis
        .hset(keys.reservations(), 2, "req-2:1700000000000")
        .await
        .unwrap();
    assert_eq!(poll(2).await, json!({"status": "queued"}));

    let _: () = redis
        .set(
            keys.result(3),
            r#"{"status":"success","order_id":"0190-abc"}"#,
        )
        .await
        .unwrap();
    assert_eq!(
        poll(3).await,
        json!({"status": "success", "order_id": "0190-abc"})
    );

    let _: () = redis
        .set(keys.result(4), r#"{"status":"failed","reason":"sold_out"}"#)
        .await
        .unwrap();
    assert_eq!(poll(4).await, json!({"status": "failed"}));

    // Redis lost the result: MySQL answers.
    let db = api.env.db().await;
    let order_id = "01900000-0000-7000-8000-000000000005";
    sqlx::query(
        "INSERT INTO orders (id, request_id, user_id, sale_id, goods_id, amount_cents, expires_at) \
         VALUES (?, 'req-5', 5, ?, ?, 19900, NOW())",
    )
    .bind(order_id)
    .bind(sale.id)
    .bind(sale.goods_id)
    .execute(&db)
    .await
    .unwrap();
    assert_eq!(
        poll(5).await,
        json!({"status": "success", "order_id": order_id})
    );
    sqlx::query(
        "INSERT INTO failed_admissions (request_id, user_id, sale_id, reason) VALUES ('req-6', 6, ?, 'sold_out')",
    )
    .bind(sale.id)
    .execute(&db)
    .await
    .unwrap();
    assert_eq!(poll(6).await, json!({"status": "failed"}));

    // Another user's result is not visible: user 7 sees none.
    assert_eq!(poll(7).await, json!({"status": "none"}));
    let resp = api
        .http
        .get(api.url(&url))
        .header("x-user-id", "3")
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::UNAUTHORIZED).await;
    api.stop().await;
}

#[tokio::test]
async fn admin_creates_sales_and_invalidates_the_cache() {
    let api = Api::start().await;
    let starts = Utc::now() - chrono::Duration::seconds(5);
    let body = json!({
        "title": "Laptop",
        "price_cents": 150_000,
        "sale_price_cents": 99_000,
        "stock": 3,
        "starts_at": starts.to_rfc3339(),
        "ends_at": (starts + chrono::Duration::hours(1)).to_rfc3339(),
    });
    let resp = api.post_json("/admin/sales", body.clone()).await;
    problem(resp, StatusCode::UNAUTHORIZED).await;
    let resp = api
        .http
        .post(api.url("/admin/sales"))
        .bearer_auth("wrong-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::UNAUTHORIZED).await;
    // A buyer's token is not an admin token.
    let resp = api
        .http
        .post(api.url("/admin/sales"))
        .bearer_auth(api.token(1))
        .json(&body)
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::UNAUTHORIZED).await;

    // The first sale id gets probed (and cached as unknown) before creation.
    let resp = api
        .http
        .get(api.url("/api/v1/sales/1"))
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::NOT_FOUND).await;

    let resp = api
        .http
        .post(api.url("/admin/sales"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let sale: Value = resp.json().await.unwrap();
    assert_eq!(sale["id"], 1);
    assert_eq!(sale["stock_left"], 3);
    assert_eq!(sale["status"], "active");
    let resp = api
        .http
        .get(api.url("/api/v1/sales/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "null marker was invalidated");
    let mut redis = api.redis().await;
    let stock: i64 = redis.get(api.env.keys().sale(1).stock()).await.unwrap();
    assert_eq!(stock, 3, "warmed into Redis");

    // Invalid sales: 400, nothing created.
    let mut bad = body.clone();
    bad["stock"] = json!(0);
    let resp = api
        .http
        .post(api.url("/admin/sales"))
        .bearer_auth(ADMIN)
        .json(&bad)
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::BAD_REQUEST).await;
    let mut bad = body.clone();
    bad["starts_at"] = json!("yesterday");
    let resp = api
        .http
        .post(api.url("/admin/sales"))
        .bearer_auth(ADMIN)
        .json(&bad)
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::BAD_REQUEST).await;
    let db = api.env.db().await;
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sales")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 1);
    api.stop().await;
}

/// A Redis user that may run everything but `SET`, and its password.
async fn redis_user_without_set(admin: &mut redis::aio::MultiplexedConnection) -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (user, password) = (format!("noset-{}", &id[..12]), id);
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-set")
        .query_async(admin)
        .await
        .expect("ACL SETUSER");
    (user, password)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lock_set_still_answers_and_releases_no_lock_it_never_set() {
    let base = seckill_contracts::Config::load(None).expect("config");
    let admin_client = redis::Client::open(base.redis.url.as_str()).unwrap();
    let mut admin = admin_client
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (user, password) = redis_user_without_set(&mut admin).await;
    let api = Api::start_with(|c| {
        c.redis.url = c
            .redis
            .url
            .replacen("redis://", &format!("redis://{user}:{password}@"), 1);
    })
    .await;
    // The setup is real: this user's `SET NX` fails on a live connection.
    let mut limited = redis::Client::open(api.config.redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let set: redis::RedisResult<Option<String>> = redis::cmd("SET")
        .arg(api.env.keys().lock("probe"))
        .arg("x")
        .arg("NX")
        .query_async(&mut limited)
        .await;
    assert!(set.is_err(), "SET must be refused: {set:?}");

    let sale = api.active_sale().await;
    let lock = api.env.keys().lock(&format!("sale-cache:{}", sale.id));
    // Every command Redis runs that names the lock key.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let monitor = admin_client.get_async_monitor().await.expect("MONITOR");
    let watcher = {
        let (seen, lock) = (seen.clone(), lock.clone());
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut lines = monitor.into_on_message::<String>();
            while let Some(line) = lines.next().await {
                if line.contains(&lock) {
                    seen.lock().unwrap().push(line);
                }
            }
        })
    };
    let loads = api.state.sale_db_loads();
    let resp = api
        .http
        .get(api.url(&format!("/api/v1/sales/{}", sale.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "Redis trouble is no outage");
    assert_eq!(api.state.sale_db_loads(), loads + 1, "read from MySQL");
    // MONITOR lags a little behind the commands it reports.
    tokio::time::sleep(Duration::from_millis(300)).await;
    watcher.abort();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|l| !l.contains("EVAL") && !l.contains("lua]") && !l.contains("\"DEL\"")),
        "a lock that was never set must not be compare-and-deleted: {seen:?}"
    );

    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut admin)
        .await
        .expect("ACL DELUSER");
    api.stop().await;
}

/// The published key set verifies the tokens the api signs at login,
/// checked from `n` and `e` alone by an independent implementation, and
/// carries no private part.
#[tokio::test]
async fn jwks_publishes_the_keys_that_verify_login_tokens() {
    let api = Api::start().await;
    let r = api
        .http
        .get(api.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "public, max-age=60");
    let set: Value = r.json().await.unwrap();
    let keys = set["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let jwk = &keys[0];
    assert_eq!(jwk["kid"], test_keys().kid.as_str());
    assert_eq!(jwk["kty"], "RSA");
    assert!(jwk.get("d").is_none() && jwk.get("p").is_none(), "{jwk}");

    let credentials = json!({"username": "jwks_buyer", "password": "correct horse battery"});
    let r = api
        .post_json("/api/v1/auth/register", credentials.clone())
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let login: Value = api
        .post_json("/api/v1/auth/login", credentials)
        .await
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap();
    let key = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().unwrap(),
        jwk["e"].as_str().unwrap(),
    )
    .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_issuer(&[api.config.jwt.issuer.as_str()]);
    validation.set_audience(&[api.config.jwt.audience.as_str()]);
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.kid.as_deref(), jwk["kid"].as_str());
    jsonwebtoken::decode::<Value>(token, &key, &validation).expect("verifies with the JWK");
    api.stop().await;
}

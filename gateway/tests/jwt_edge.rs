//! The JWT matrix through the real gateway: every bad token is a 401 with
//! `WWW-Authenticate` and the rule behind the check never ran (its Redis
//! counter did not move).

mod support;

use base64::Engine;
use seckill_contracts::testkit::{TestEnv, TestKeys};
use support::{keys, write_rules, GatewayProc, Upstream};

const COUNTING: &str = r#"
return {
  access = function(req)
    if req.route == "api" then
      seckill.redis("touch", { seckill.key("touched") })
    end
  end,
}
"#;
const TOUCH: &str = "return redis.call('INCR', KEYS[1])";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn hs256(header: &serde_json::Value, claims: &serde_json::Value, secret: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()))
}

#[tokio::test]
async fn every_bad_token_is_401_and_changes_nothing() {
    let env = TestEnv::new().await;
    let rules = tempfile::tempdir().unwrap();
    let rules_dir = rules.path().join("lua");
    write_rules(&rules_dir, COUNTING, &[("redis/touch.lua", TOUCH)]);
    let upstream = Upstream::start("a").await;
    let gw = GatewayProc::start(GatewayProc::config(&env, &[upstream.addr], &rules_dir)).await;
    let c = &gw.config.jwt;
    let (iss, aud) = (c.issuer.as_str(), c.audience.as_str());
    let k = keys();
    let claims = |uid: u64, ttl: i64| TestKeys::claims_for(uid, iss, aud, ttl);
    let now = chrono::Utc::now().timestamp() as u64;

    let mut future_nbf = claims(1, 600);
    future_nbf.nbf = now + 60;
    let mut wrong_iss = claims(1, 600);
    wrong_iss.iss = "someone-else".into();
    let mut wrong_aud = claims(1, 600);
    wrong_aud.aud = "other-audience".into();
    let other_key = TestKeys::generate(&k.kid);
    let valid = k.mint(&claims(1, 600));
    let parts: Vec<&str> = valid.split('.').collect();
    let mut tampered_claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    tampered_claims["sub"] = "2".into();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(tampered_claims.to_string().as_bytes()),
        parts[2]
    );
    let body = serde_json::to_value(claims(1, 600)).unwrap();
    let mut no_aud = body.clone();
    no_aud.as_object_mut().unwrap().remove("aud");
    let alg_none = format!(
        "{}.{}.",
        b64(
            serde_json::json!({"alg": "none", "typ": "JWT", "kid": k.kid})
                .to_string()
                .as_bytes()
        ),
        b64(body.to_string().as_bytes())
    );
    let rs_header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": k.kid});
    let forge_rs = |header: serde_json::Value, claims: &serde_json::Value| {
        // A well-formed RS256 token over these parts, signed by our key.
        use rsa::pkcs1v15::SigningKey;
        use rsa::pkcs8::DecodePrivateKey;
        use rsa::signature::{SignatureEncoding, Signer};
        let key = rsa::RsaPrivateKey::from_pkcs8_pem(&k.private_pem).unwrap();
        let signer = SigningKey::<sha2::Sha256>::new(key);
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = signer.sign(input.as_bytes()).to_vec();
        format!("{input}.{}", b64(&sig))
    };

    let cases: Vec<(&str, String)> = vec![
        ("expired", k.mint(&claims(1, -60))),
        ("exp 6 s ago", k.mint(&claims(1, -6))),
        ("nbf in the future", k.mint(&future_nbf)),
        ("wrong key, same kid", other_key.mint(&claims(1, 600))),
        ("alg none", alg_none),
        (
            "HS256 with the public key as secret",
            hs256(
                &serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": k.kid}),
                &body,
                k.public_pem.as_bytes(),
            ),
        ),
        ("tampered payload", tampered),
        (
            "unknown kid",
            forge_rs(
                serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "nope"}),
                &body,
            ),
        ),
        (
            "hostile kid",
            forge_rs(
                serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "../../etc/passwd"}),
                &body,
            ),
        ),
        ("missing aud", forge_rs(rs_header.clone(), &no_aud)),
        ("wrong iss", k.mint(&wrong_iss)),
        ("wrong aud", k.mint(&wrong_aud)),
        ("garbage", "not-a-token".into()),
        ("three dots", "a.b.c".into()),
    ];

    let client = reqwest::Client::new();
    let mut redis = env.redis().await;
    let counter = format!("{}:touched", env.config.redis.key_prefix);
    for (name, token) in &cases {
        let r = client
            .get(gw.url("/api/v1/orders"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{name}");
        let challenge = r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.starts_with("Bearer"), "{name}: {challenge}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
    }
    let missing = client.get(gw.url("/api/v1/orders")).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let basic = client
        .get(gw.url("/api/v1/orders"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);

    let touched: Option<i64> = redis::cmd("GET")
        .arg(&counter)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(touched, None, "no rule ran for a refused token");
    assert_eq!(upstream.hits(), 0, "nothing reached the upstream");

    // exp 3 s ago is inside the 5 s leeway; a valid token passes and runs the rule.
    for token in [valid, k.mint(&claims(1, -3))] {
        let r = client
            .get(gw.url("/api/v1/orders"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let touched: Option<i64> = redis::cmd("GET")
        .arg(&counter)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(touched, Some(2));
    assert_eq!(upstream.hits(), 2);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("gateway_jwt_failures_total{reason=\"expired\"}"),
        "{metrics}"
    );
}

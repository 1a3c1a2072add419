//! The JSON Web Key Set format (RFC 7517) of the api's verification keys:
//! written by the api at `/.well-known/jwks.json`, read back by every
//! gateway that refreshes its keys from there.
//!
//! Reading is strict where a mistake would change who is trusted and lenient
//! where the RFC asks for it: keys of another type, algorithm or use are
//! skipped (a JWKS may carry encryption keys too), but an RSA signing key
//! that is malformed, too short or repeats a kid refuses the whole document,
//! so a half-broken set never replaces a good one.

use base64::Engine;

use crate::jwt::{JwtSetupError, VerifyKey};

/// JWK members are unpadded base64url (RFC 7518 §6.3.1).
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why a fetched key set was refused.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("not a JSON object with a `keys` array")]
    NotAKeySet,
    #[error("key #{index}: {reason}")]
    BadMember { index: usize, reason: &'static str },
    #[error(transparent)]
    Key(#[from] JwtSetupError),
    #[error("kid {0:?} appears twice")]
    DuplicateKid(String),
    #[error("no RS256 signing key in the set")]
    Empty,
}

/// The set as a document: `{"keys": [jwk, ...]}` in the order given.
pub fn document<'a>(keys: impl IntoIterator<Item = &'a VerifyKey>) -> serde_json::Value {
    let keys: Vec<_> = keys.into_iter().map(VerifyKey::to_jwk).collect();
    serde_json::json!({ "keys": keys })
}

/// Reads the RS256 signing keys of a JWKS body; `source` (the URL) is named
/// in key errors.
pub fn parse(body: &[u8], source: &str) -> Result<Vec<VerifyKey>, JwksError> {
    let doc: serde_json::Value = serde_json::from_slice(body).map_err(|_| JwksError::NotAKeySet)?;
    let members = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or(JwksError::NotAKeySet)?;
    let mut keys: Vec<VerifyKey> = Vec::with_capacity(members.len());
    for (index, jwk) in members.iter().enumerate() {
        let Some(key) = signing_key(index, jwk, source)? else {
            continue;
        };
        if keys.iter().any(|k| k.kid() == key.kid()) {
            return Err(JwksError::DuplicateKid(key.kid().to_string()));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(JwksError::Empty);
    }
    Ok(keys)
}

/// One member: `None` when it is not meant for RS256 signatures.
fn signing_key(
    index: usize,
    jwk: &serde_json::Value,
    source: &str,
) -> Result<Option<VerifyKey>, JwksError> {
    let bad = |reason| JwksError::BadMember { index, reason };
    let field = |name: &str| jwk.get(name).and_then(|v| v.as_str());
    if !jwk.is_object() {
        return Err(bad("not an object"));
    }
    let is_rsa = field("kty") == Some("RSA");
    let for_rs256 = field("alg").is_none_or(|a| a == "RS256");
    let for_signing = field("use").is_none_or(|u| u == "sig");
    if !(is_rsa && for_rs256 && for_signing) {
        return Ok(None);
    }
    let kid = field("kid").ok_or(bad("an RSA signing key without a kid"))?;
    let component = |name| {
        field(name)
            .and_then(|v| B64.decode(v).ok())
            .filter(|v| !v.is_empty())
    };
    let n = component("n").ok_or(bad("`n` is missing or not base64url"))?;
    let e = component("e").ok_or(bad("`e` is missing or not base64url"))?;
    Ok(Some(VerifyKey::from_components(kid, source, &n, &e)?))
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::TestKeys;
    use std::sync::OnceLock;

    fn key() -> &'static TestKeys {
        static K: OnceLock<TestKeys> = OnceLock::new();
        K.get_or_init(|| TestKeys::generate("k1"))
    }

    fn verify_key() -> VerifyKey {
        VerifyKey::from_pem("k1", "test", key().public_pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_written_set_reads_back_as_the_same_keys() {
        let doc = document([&verify_key()]);
        let keys = parse(doc.to_string().as_bytes(), "test").unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid(), "k1");
        assert!(keys[0].same_key(&verify_key()));
    }

    #[test]
    fn keys_for_other_uses_are_skipped_not_fatal() {
        let mut doc = document([&verify_key()]);
        let keys = doc["keys"].as_array_mut().unwrap();
        keys.push(serde_json::json!({"kty": "EC", "kid": "ec", "crv": "P-256"}));
        keys.push(
            serde_json::json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQ", "e": "AQ"}),
        );
        keys.push(
            serde_json::json!({"kty": "RSA", "kid": "ps", "alg": "PS256", "n": "AQ", "e": "AQ"}),
        );
        let parsed = parse(doc.to_string().as_bytes(), "test").unwrap();
        let kids: Vec<_> = parsed.iter().map(VerifyKey::kid).collect();
        assert_eq!(kids, ["k1"]);
    }

    #[test]
    fn a_broken_signing_key_refuses_the_whole_set() {
        let good = document([&verify_key()]);
        let with = |extra: serde_json::Value| {
            let mut doc = good.clone();
            doc["keys"].as_array_mut().unwrap().push(extra);
            parse(doc.to_string().as_bytes(), "test")
        };
        assert!(matches!(
            with(serde_json::json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"})),
            Err(JwksError::BadMember { index: 1, .. })
        ));
        assert!(matches!(
            with(serde_json::json!({"kty": "RSA", "kid": "x", "n": "!!", "e": "AQAB"})),
            Err(JwksError::BadMember { .. })
        ));
        // A 16-bit modulus: refused as too short, not trusted.
        let short = with(serde_json::json!({"kty": "RSA", "kid": "x", "n": "wAE", "e": "AQAB"}));
        assert!(matches!(short, Err(JwksError::Key(_))), "{short:?}");
        let dup = good["keys"][0].clone();
        assert!(matches!(with(dup), Err(JwksError::DuplicateKid(k)) if k == "k1"));
    }

    #[test]
    fn junk_and_empty_sets_are_refused() {
        for body in ["", "[]", "{\"keys\": 3}", "{\"nokeys\": []}", "<html>"] {
            assert!(
                matches!(parse(body.as_bytes(), "t"), Err(JwksError::NotAKeySet)),
                "{body}"
            );
        }
        assert!(matches!(
            parse(b"{\"keys\": []}", "t"),
            Err(JwksError::Empty)
        ));
        assert!(matches!(
            parse(b"{\"keys\": [{\"kty\":\"oct\",\"k\":\"AA\"}]}", "t"),
            Err(JwksError::Empty)
        ));
    }
}

//! RS256 access-token verification at the edge.
//!
//! Every non-public route needs `Authorization: Bearer <JWT>`; the gateway
//! refuses bad tokens with a 401 before any rule, Redis call or upstream
//! request happens (SPEC §3), so a flood of forged tokens costs the platform
//! nothing beyond this module.
//!
//! How a token flows through [`JwtVerifier::verify`]:
//!
//! 1. **Size**: anything over [`MAX_TOKEN_BYTES`] is `Malformed` unread, so a
//!    huge header cannot make us base64-decode or hash megabytes.
//! 2. **Cache**: the SHA-256 of the token bytes is looked up in a bounded
//!    cache of tokens that already passed ([`token_cache`]). A buyer hammering the sale sends
//!    the same token again and again; a hit costs a hash instead of an RSA
//!    verification. The hit's `exp` is re-checked against the clock, so a
//!    token never outlives its expiry just because eviction is lazy.
//! 3. **Header**: decoded by hand, before the library sees it, so that
//!    `alg` must be exactly `RS256` (`none`, `HS256` with the public key as
//!    the secret, `RS512`, … are `WrongAlgorithm`) and `kid` must name one of
//!    the keys in force (configured files, or a JWKS refresh: see
//!    [`JwtVerifier::replace_keys`]). The kid is only ever a map key: it
//!    never reaches the filesystem.
//! 4. **Signature and claims**: the RSASSA-PKCS1-v1_5 SHA-256 signature is
//!    verified over `header.payload` with that key (aws-lc-rs, the library
//!    `jsonwebtoken` itself uses, but with the key parsed once at start-up
//!    instead of on every call: a buyer's first request always pays this).
//!    Only then is the payload read: `exp`, `nbf`, `iss`, `aud`, `sub` and
//!    `iat` are required, `exp`/`nbf` hold with the configured leeway (at
//!    most 5 s), `iss` and `aud` are exactly ours.
//! 5. **Subject**: `sub` must be a user id ([`AccessClaims::user_id`]); the
//!    claims are cached until their `exp` and handed to the proxy in an `Arc`.
//!
//! Only successes are cached, so invalid tokens cannot fill the cache; every
//! failure is one [`JwtRejection`], whose [`reason`](JwtRejection::reason)
//! labels the failure metric and whose [`detail`](JwtRejection::detail) is
//! the 401 body.

use std::collections::HashMap;
use std::sync::Arc;

use crate::claims::AccessClaims;
use crate::clock::unix_secs;
use crate::config::JwtConfig;
use arc_swap::ArcSwap;
use aws_lc_rs::signature::{ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
use base64::Engine;
use rsa::pkcs1::{DecodeRsaPublicKey, EncodeRsaPublicKey};
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::RsaPublicKey;
use sha2::{Digest, Sha256};

pub mod token_cache;
use token_cache::{TokenCache, TokenHash};

/// Longest token accepted (8 KiB). Ours are a few hundred bytes; anything
/// bigger is refused before it is decoded or hashed.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The clock skew contract: `jwt.leeway_secs` may not exceed this, and
/// [`JwtVerifier::new`] clamps to it so no caller can widen the window.
pub const MAX_LEEWAY_SECS: u64 = 5;

/// Smallest RSA modulus accepted for a verification key; shorter keys are
/// forgeable and indicate a misconfiguration.
pub const MIN_RSA_BITS: usize = 2048;

/// A byte of a compact JWS: base64url or the dot between segments.
fn is_jws_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// The only algorithm a token may declare.
const ALG: &str = "RS256";

/// JWS segments are unpadded base64url (RFC 7515 §2).
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The claims every token must carry (`iat` is needed by [`AccessClaims`]
/// itself).
const REQUIRED_CLAIMS: [&str; 6] = ["exp", "nbf", "iss", "aud", "sub", "iat"];

/// Why the verifier could not be built from configuration. The gateway
/// refuses to start on any of these: running without a usable key would
/// turn every authenticated request into a 401, or worse, accept the wrong
/// tokens.
#[derive(Debug, thiserror::Error)]
pub enum JwtSetupError {
    /// No verification key at all: nothing could ever be accepted.
    #[error("jwt: no public keys configured")]
    NoKeys,
    /// Issuer or audience is empty, which would make that check vacuous.
    #[error("jwt: {0} must not be empty")]
    EmptySetting(&'static str),
    /// A key has an empty kid; tokens name keys by kid, so it must exist.
    #[error("jwt: public key at {path} has an empty kid")]
    EmptyKid {
        /// Where the key came from.
        path: String,
    },
    /// Two keys share a kid, so a token's key would be ambiguous.
    #[error("jwt: kid {kid:?} is configured twice ({path})")]
    DuplicateKid {
        /// The repeated kid.
        kid: String,
        /// The second key's source.
        path: String,
    },
    /// The key file could not be read.
    #[error("jwt: reading public key {kid:?} from {path}: {source}")]
    Read {
        /// The key's kid.
        kid: String,
        /// The file that failed.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a usable RSA public key (wrong format, a private key,
    /// another key type, or too short).
    #[error("jwt: public key {kid:?} at {path} is unusable: {reason}")]
    Key {
        /// The key's kid.
        kid: String,
        /// Where the key came from.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a request's token was refused. Every variant is a 401; the variant
/// only decides the metric label and the explanation, so clients and
/// operators can tell an expired session from an attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtRejection {
    /// No bearer credentials: no `Authorization` header, or one with a
    /// scheme other than `Bearer` (RFC 6750 §3.1 treats an unsupported
    /// scheme like no credentials).
    Missing,
    /// Not a JWT: wrong shape, bad base64 or JSON, too long, empty.
    Malformed,
    /// The header has no `kid`, or one that names no loaded key.
    UnknownKey,
    /// The header's `alg` is anything but `RS256` (including `none`).
    WrongAlgorithm,
    /// The signature does not verify with the named key.
    BadSignature,
    /// `exp` is past, beyond the leeway.
    Expired,
    /// `nbf` is in the future, beyond the leeway.
    NotYetValid,
    /// `iss` is not the configured issuer.
    WrongIssuer,
    /// `aud` is not the configured audience.
    WrongAudience,
    /// A required claim (`exp`, `nbf`, `iss`, `aud`, `sub`, `iat`) is absent.
    MissingClaim,
    /// `sub` is not a positive decimal user id.
    BadSubject,
}

impl JwtRejection {
    /// Stable snake_case label for the `reason` of the JWT failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtRejection::Missing => "missing",
            JwtRejection::Malformed => "malformed",
            JwtRejection::UnknownKey => "unknown_key",
            JwtRejection::WrongAlgorithm => "wrong_algorithm",
            JwtRejection::BadSignature => "bad_signature",
            JwtRejection::Expired => "expired",
            JwtRejection::NotYetValid => "not_yet_valid",
            JwtRejection::WrongIssuer => "wrong_issuer",
            JwtRejection::WrongAudience => "wrong_audience",
            JwtRejection::MissingClaim => "missing_claim",
            JwtRejection::BadSubject => "bad_subject",
        }
    }

    /// A sentence for the 401 problem body and the `WWW-Authenticate`
    /// `error_description`; it never contains quotes or backslashes, so it
    /// can be placed in a quoted header parameter as is.
    pub fn detail(&self) -> &'static str {
        match self {
            JwtRejection::Missing => "a bearer token is required in the Authorization header",
            JwtRejection::Malformed => "the bearer token is not a well-formed JWT",
            JwtRejection::UnknownKey => "the token is not signed with a known key",
            JwtRejection::WrongAlgorithm => "the token must be signed with RS256",
            JwtRejection::BadSignature => "the token signature is invalid",
            JwtRejection::Expired => "the token has expired",
            JwtRejection::NotYetValid => "the token is not valid yet",
            JwtRejection::WrongIssuer => "the token was issued by an unexpected issuer",
            JwtRejection::WrongAudience => "the token is not meant for this service",
            JwtRejection::MissingClaim => "the token lacks a required claim",
            JwtRejection::BadSubject => "the token subject is not a valid user id",
        }
    }
}

impl std::fmt::Display for JwtRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.detail())
    }
}

impl std::error::Error for JwtRejection {}

/// Verifies access tokens against a set of public keys.
///
/// `Send + Sync`, meant to be shared in an `Arc` by every proxy worker. The
/// key set can be replaced while requests run ([`JwtVerifier::replace_keys`]:
/// a JWKS refresh, a keyring reload); a request sees either the old set or
/// the new one, never a mix. Only a cache miss reads the set, so the swap
/// costs the hot path nothing.
pub struct JwtVerifier {
    keys: ArcSwap<KeySet>,
    issuer: String,
    audience: String,
    leeway_secs: u64,
    cache: Option<TokenCache>,
    /// RSA verifications performed, so tests can prove a cache hit skipped one.
    #[cfg(test)]
    rsa_verifications: std::sync::atomic::AtomicU64,
    /// Seconds added to the wall clock for the verifier's own time checks,
    /// so tests can age a cached token without sleeping.
    #[cfg(test)]
    clock_offset_secs: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("kids", &self.kids())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .finish_non_exhaustive()
    }
}

/// One verification key on its way into a verifier: its kid, where it came
/// from (named in errors) and the checked RSA public key.
#[derive(Clone)]
pub struct VerifyKey {
    kid: String,
    source: String,
    rsa: RsaPublicKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl VerifyKey {
    /// A PEM public key (SPKI `BEGIN PUBLIC KEY` or PKCS#1 `BEGIN RSA PUBLIC
    /// KEY`); private keys and keys under [`MIN_RSA_BITS`] are refused.
    pub fn from_pem(kid: &str, source: &str, pem: &[u8]) -> Result<VerifyKey, JwtSetupError> {
        let rsa = read_public_key(pem).map_err(|reason| key_error(kid, source, reason))?;
        Self::from_rsa(kid, source, rsa)
    }

    /// A key given by its modulus and exponent (big-endian), as a JWK carries it.
    pub fn from_components(
        kid: &str,
        source: &str,
        n: &[u8],
        e: &[u8],
    ) -> Result<VerifyKey, JwtSetupError> {
        let rsa = RsaPublicKey::new(
            rsa::BigUint::from_bytes_be(n),
            rsa::BigUint::from_bytes_be(e),
        )
        .map_err(|e| key_error(kid, source, format!("not a usable RSA key: {e}")))?;
        Self::from_rsa(kid, source, rsa)
    }

    fn from_rsa(kid: &str, source: &str, rsa: RsaPublicKey) -> Result<VerifyKey, JwtSetupError> {
        if kid.is_empty() {
            return Err(JwtSetupError::EmptyKid {
                path: source.to_string(),
            });
        }
        check_size(&rsa).map_err(|reason| key_error(kid, source, reason))?;
        Ok(VerifyKey {
            kid: kid.to_string(),
            source: source.to_string(),
            rsa,
        })
    }

    /// The key id tokens name this key by.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Whether `other` is the same RSA key (whatever its kid or source).
    pub fn same_key(&self, other: &VerifyKey) -> bool {
        self.rsa == other.rsa
    }

    /// This key as an RFC 7517 JWK (see [`crate::jwks`] for the set).
    pub fn to_jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": B64.encode(self.rsa.n().to_bytes_be()),
            "e": B64.encode(self.rsa.e().to_bytes_be()),
        })
    }
}

fn key_error(kid: &str, source: &str, reason: String) -> JwtSetupError {
    JwtSetupError::Key {
        kid: kid.to_string(),
        path: source.to_string(),
        reason,
    }
}

/// What a [`JwtVerifier::replace_keys`] changed, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyChange {
    /// Kids that verify now and did not before.
    pub added: Vec<String>,
    /// Kids that no longer verify (or whose key changed under the same kid).
    pub removed: Vec<String>,
}

impl KeyChange {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// The keys in force: parsed once for verification, and as given (for the
/// JWKS and for change detection).
struct KeySet {
    keys: HashMap<String, (VerifyKey, ParsedPublicKey)>,
    /// In the order given.
    order: Vec<String>,
}

impl KeySet {
    fn build(keys: Vec<VerifyKey>) -> Result<KeySet, JwtSetupError> {
        if keys.is_empty() {
            return Err(JwtSetupError::NoKeys);
        }
        let mut map = HashMap::with_capacity(keys.len());
        let mut order = Vec::with_capacity(keys.len());
        for key in keys {
            if map.contains_key(&key.kid) {
                return Err(JwtSetupError::DuplicateKid {
                    kid: key.kid,
                    path: key.source,
                });
            }
            let parsed = parse_for_verification(&key.rsa)
                .map_err(|reason| key_error(&key.kid, &key.source, reason))?;
            order.push(key.kid.clone());
            map.insert(key.kid.clone(), (key, parsed));
        }
        Ok(KeySet { keys: map, order })
    }

    /// Kids of `self` missing from `new` or bound to another key there.
    fn lost_in(&self, new: &KeySet) -> Vec<String> {
        self.order
            .iter()
            .filter(|kid| match (self.keys.get(*kid), new.keys.get(*kid)) {
                (Some((old, _)), Some((now, _))) => !old.same_key(now),
                _ => true,
            })
            .cloned()
            .collect()
    }
}

impl JwtVerifier {
    /// Reads every PEM in `config.public_keys` (SPKI `BEGIN PUBLIC KEY` and
    /// PKCS#1 `BEGIN RSA PUBLIC KEY` both accepted); errors name the kid and
    /// path. `cache_entries` bounds the verified-token cache (0 disables it).
    pub fn from_config(
        config: &JwtConfig,
        cache_entries: u64,
    ) -> Result<JwtVerifier, JwtSetupError> {
        let keys = configured_keys(config)?;
        Self::with_keys(
            keys,
            &config.issuer,
            &config.audience,
            config.leeway_secs,
            cache_entries,
        )
    }

    /// For tests and embedding: keys given as `(kid, PEM bytes)` instead of
    /// files. `leeway_secs` is clamped to [`MAX_LEEWAY_SECS`].
    pub fn new(
        keys: &[(String, Vec<u8>)],
        issuer: &str,
        audience: &str,
        leeway_secs: u64,
        cache_entries: u64,
    ) -> Result<JwtVerifier, JwtSetupError> {
        let keys = keys
            .iter()
            .map(|(kid, pem)| VerifyKey::from_pem(kid, "(in memory)", pem))
            .collect::<Result<Vec<_>, _>>()?;
        Self::with_keys(keys, issuer, audience, leeway_secs, cache_entries)
    }

    /// A verifier over already-checked keys.
    pub fn with_keys(
        keys: Vec<VerifyKey>,
        issuer: &str,
        audience: &str,
        leeway_secs: u64,
        cache_entries: u64,
    ) -> Result<JwtVerifier, JwtSetupError> {
        let keys = KeySet::build(keys)?;
        Self::assemble(keys, issuer, audience, leeway_secs, cache_entries)
    }

    fn assemble(
        keys: KeySet,
        issuer: &str,
        audience: &str,
        leeway_secs: u64,
        cache_entries: u64,
    ) -> Result<JwtVerifier, JwtSetupError> {
        if issuer.is_empty() {
            return Err(JwtSetupError::EmptySetting("jwt.issuer"));
        }
        if audience.is_empty() {
            return Err(JwtSetupError::EmptySetting("jwt.audience"));
        }
        let leeway_secs = leeway_secs.min(MAX_LEEWAY_SECS);
        let cache = (cache_entries > 0).then(|| TokenCache::new(cache_entries));

        Ok(JwtVerifier {
            keys: ArcSwap::from_pointee(keys),
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            leeway_secs,
            cache,
            #[cfg(test)]
            rsa_verifications: std::sync::atomic::AtomicU64::new(0),
            #[cfg(test)]
            clock_offset_secs: std::sync::atomic::AtomicI64::new(0),
        })
    }

    /// A verifier with no key yet, for a gateway whose keys all come from
    /// a JWKS: every token is `UnknownKey` until [`JwtVerifier::replace_keys`]
    /// installs a set.
    pub fn awaiting_keys(
        issuer: &str,
        audience: &str,
        leeway_secs: u64,
        cache_entries: u64,
    ) -> Result<JwtVerifier, JwtSetupError> {
        let none = KeySet {
            keys: HashMap::new(),
            order: Vec::new(),
        };
        Self::assemble(none, issuer, audience, leeway_secs, cache_entries)
    }

    /// Replaces the whole key set. A bad set (empty, a duplicate kid) is
    /// refused and the current one stays. When a kid leaves (or its key
    /// changes) every cached token is forgotten, so no token of a withdrawn
    /// key is accepted from the cache; keys only added keep the cache.
    pub fn replace_keys(&self, keys: Vec<VerifyKey>) -> Result<KeyChange, JwtSetupError> {
        let new = KeySet::build(keys)?;
        let old = self.keys.load();
        let change = KeyChange {
            added: new.lost_in(&old),
            removed: old.lost_in(&new),
        };
        if change.is_empty() {
            return Ok(change);
        }
        self.keys.store(Arc::new(new));
        if !change.removed.is_empty() {
            if let Some(cache) = &self.cache {
                cache.clear();
            }
        }
        Ok(change)
    }

    /// The kids that verify now, sorted.
    pub fn kids(&self) -> Vec<String> {
        let mut kids = self.keys.load().order.clone();
        kids.sort_unstable();
        kids
    }

    /// Whether `kid` names a key of the current set.
    pub fn knows_kid(&self, kid: &str) -> bool {
        self.keys.load().keys.contains_key(kid)
    }

    /// The verification keys as a JSON Web Key Set (RFC 7517), in the order
    /// given: what the api serves at `/.well-known/jwks.json` so others can
    /// verify its tokens from the public halves alone.
    pub fn jwks(&self) -> serde_json::Value {
        let set = self.keys.load();
        crate::jwks::document(
            set.order
                .iter()
                .filter_map(|kid| set.keys.get(kid))
                .map(|(key, _)| key),
        )
    }

    /// Verifies a raw token (without `Bearer `). `Ok` gives the claims, in an
    /// `Arc` so cache hits share one allocation; `sub` is known to be a
    /// valid user id.
    pub fn verify(&self, token: &str) -> Result<Arc<AccessClaims>, JwtRejection> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(JwtRejection::Malformed);
        }
        // A hit is a token these exact bytes already passed as, so the
        // character check below (a visible cost per request in the
        // gateway's profile) is only for tokens not seen yet.
        let hash: TokenHash = Sha256::digest(token.as_bytes()).into();
        if let Some(cache) = &self.cache {
            if let Some(claims) = cache.get(&hash) {
                // Entries are not dropped at `exp`: the clock decides here.
                if self.is_expired(&claims) {
                    cache.remove(&hash);
                    return Err(JwtRejection::Expired);
                }
                return Ok(claims);
            }
        }
        // A compact JWS is base64url segments joined by dots; anything else
        // (spaces, quotes, non-ASCII) is refused before any decoding.
        if !token.bytes().all(is_jws_byte) {
            return Err(JwtRejection::Malformed);
        }
        let claims = Arc::new(self.verify_uncached(token)?);
        if let Some(cache) = &self.cache {
            cache.insert(hash, claims.clone());
        }
        Ok(claims)
    }

    /// Extracts the token from an `Authorization` header value (`Bearer <t>`,
    /// scheme case-insensitive per RFC 7235) and verifies it. `None`, or a
    /// different scheme such as `Basic`, is `Missing`; `Bearer` with no
    /// token is `Malformed`.
    pub fn verify_header(
        &self,
        authorization: Option<&str>,
    ) -> Result<Arc<AccessClaims>, JwtRejection> {
        let value = authorization.ok_or(JwtRejection::Missing)?.trim();
        let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(JwtRejection::Missing);
        }
        let token = rest.trim_matches([' ', '\t']);
        if token.is_empty() {
            return Err(JwtRejection::Malformed);
        }
        self.verify(token)
    }

    /// Tokens currently cached (expired ones too, until replaced). For the
    /// admin surface and tests.
    pub fn cache_len(&self) -> u64 {
        self.cache.as_ref().map_or(0, TokenCache::len)
    }

    /// The full check, on a cache miss.
    fn verify_uncached(&self, token: &str) -> Result<AccessClaims, JwtRejection> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtRejection::Malformed);
        };
        let kid = check_header(header)?;
        let set = self.keys.load();
        let (_, key) = set.keys.get(&kid).ok_or(JwtRejection::UnknownKey)?;

        #[cfg(test)]
        self.rsa_verifications
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let signature = B64.decode(signature).map_err(|_| JwtRejection::Malformed)?;
        // The signing input is the token up to its second dot.
        let signed = &token[..header.len() + 1 + payload.len()];
        key.verify_sig(signed.as_bytes(), &signature)
            .map_err(|_| JwtRejection::BadSignature)?;
        let payload = B64.decode(payload).map_err(|_| JwtRejection::Malformed)?;
        let raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&payload).map_err(|_| JwtRejection::Malformed)?;

        // The signature holds; now the claims, every one checked here.
        if REQUIRED_CLAIMS.iter().any(|c| !raw.contains_key(*c)) {
            return Err(JwtRejection::MissingClaim);
        }
        let claims: AccessClaims = serde_json::from_value(serde_json::Value::Object(raw))
            .map_err(|_| JwtRejection::Malformed)?;
        // Exact string equality: an `aud` array that merely contains ours
        // is not ours (it fails to deserialize above).
        if claims.iss != self.issuer {
            return Err(JwtRejection::WrongIssuer);
        }
        if claims.aud != self.audience {
            return Err(JwtRejection::WrongAudience);
        }
        if self.is_expired(&claims) {
            return Err(JwtRejection::Expired);
        }
        if claims.nbf > self.now().saturating_add(self.leeway_secs) {
            return Err(JwtRejection::NotYetValid);
        }
        if claims.user_id().is_none() {
            return Err(JwtRejection::BadSubject);
        }
        Ok(claims)
    }

    /// `exp` is past by more than the leeway (the library's rule, so cached
    /// and fresh answers agree).
    fn is_expired(&self, claims: &AccessClaims) -> bool {
        claims.exp.saturating_add(self.leeway_secs) < self.now()
    }

    fn now(&self) -> u64 {
        unix_secs().saturating_add_signed(self.clock_offset())
    }

    #[cfg(test)]
    fn clock_offset(&self) -> i64 {
        self.clock_offset_secs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    #[cfg(not(test))]
    fn clock_offset(&self) -> i64 {
        0
    }
}

/// Decodes the JOSE header ourselves so the algorithm and kid are judged
/// before any key is chosen or signature computed. Returns the kid.
fn check_header(encoded: &str) -> Result<String, JwtRejection> {
    let bytes = B64.decode(encoded).map_err(|_| JwtRejection::Malformed)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|_| JwtRejection::Malformed)?;
    if header.get("alg").and_then(|a| a.as_str()) != Some(ALG) {
        return Err(JwtRejection::WrongAlgorithm);
    }
    // Critical extensions we do not implement must make the token invalid
    // (RFC 7515 §4.1.11); we implement none.
    if header.contains_key("crit") {
        return Err(JwtRejection::Malformed);
    }
    match header.get("kid").and_then(|k| k.as_str()) {
        Some(kid) if !kid.is_empty() => Ok(kid.to_string()),
        _ => Err(JwtRejection::UnknownKey),
    }
}

/// Reads one RSA public key PEM, SPKI or PKCS#1, and checks its size.
/// Private keys are refused: the gateway must never hold one.
fn read_public_key(pem: &[u8]) -> Result<RsaPublicKey, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not a UTF-8 PEM file".to_string())?;
    let block = |label: &str| -> Option<&str> {
        let begin = format!("-----BEGIN {label}-----");
        let end = format!("-----END {label}-----");
        let start = text.find(&begin)?;
        let stop = text[start..].find(&end)? + start + end.len();
        Some(&text[start..stop])
    };
    let key = if let Some(b) = block("PUBLIC KEY") {
        RsaPublicKey::from_public_key_pem(b)
            .map_err(|e| format!("not an RSA SubjectPublicKeyInfo key: {e}"))?
    } else if let Some(b) = block("RSA PUBLIC KEY") {
        RsaPublicKey::from_pkcs1_pem(b).map_err(|e| format!("not a PKCS#1 RSA public key: {e}"))?
    } else if text.contains("PRIVATE KEY-----") {
        return Err(
            "this is a private key; configure the public half (BEGIN PUBLIC KEY)".to_string(),
        );
    } else {
        return Err("no BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY block".to_string());
    };
    Ok(key)
}

/// Short keys are forgeable and mean a misconfiguration.
fn check_size(key: &RsaPublicKey) -> Result<(), String> {
    let bits = key.size() * 8;
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA key is {bits} bits; at least {MIN_RSA_BITS} required"
        ));
    }
    Ok(())
}

/// The keys named in `jwt.public_keys`, read from their files now, once:
/// requests never touch the filesystem.
pub fn configured_keys(config: &JwtConfig) -> Result<Vec<VerifyKey>, JwtSetupError> {
    config
        .public_keys
        .iter()
        .map(|key| {
            let path = key.path.display().to_string();
            let pem = std::fs::read(&key.path).map_err(|source| JwtSetupError::Read {
                kid: key.kid.clone(),
                path: path.clone(),
                source,
            })?;
            VerifyKey::from_pem(&key.kid, &path, &pem)
        })
        .collect()
}

/// The key in the form the verifier uses on every request.
fn parse_for_verification(key: &RsaPublicKey) -> Result<ParsedPublicKey, String> {
    // Parsed once here: verifying with a key parsed per call (as
    // `jsonwebtoken::decode` does) redoes the RSA setup every time, which
    // was a visible share of a sale's first second in the bench profile.
    let der = key
        .to_pkcs1_der()
        .map_err(|e| format!("cannot re-encode the RSA key: {e}"))?;
    ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der.as_bytes())
        .map_err(|e| format!("RSA key rejected: {e}"))
}

// The tests mint tokens with the testkit's keys; `cargo test --workspace`
// builds this crate with it (the other crates' dev-dependencies ask for it).
#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::TestKeys;
    use jsonwebtoken::Algorithm;
    use std::sync::atomic::Ordering;
    use std::sync::OnceLock;

    const ISS: &str = "seckill-api";
    const AUD: &str = "seckill";

    /// RSA key generation is slow in debug builds: once per test binary.
    fn keys() -> &'static TestKeys {
        static K: OnceLock<TestKeys> = OnceLock::new();
        K.get_or_init(|| TestKeys::generate("test-1"))
    }

    /// A second key under the same kid, for the "wrong key" case.
    fn impostor() -> &'static TestKeys {
        static K: OnceLock<TestKeys> = OnceLock::new();
        K.get_or_init(|| TestKeys::generate("test-1"))
    }

    /// A second legitimate key, for rotation.
    fn next_key() -> &'static TestKeys {
        static K: OnceLock<TestKeys> = OnceLock::new();
        K.get_or_init(|| TestKeys::generate("test-2"))
    }

    fn verifier_with(keys: &[&TestKeys], leeway: u64) -> JwtVerifier {
        let pems: Vec<(String, Vec<u8>)> = keys
            .iter()
            .map(|k| (k.kid.clone(), k.public_pem.clone().into_bytes()))
            .collect();
        JwtVerifier::new(&pems, ISS, AUD, leeway, 1_000).expect("verifier")
    }

    fn verifier() -> JwtVerifier {
        verifier_with(&[keys()], 5)
    }

    fn claims(uid: u64, ttl: i64) -> AccessClaims {
        TestKeys::claims_for(uid, ISS, AUD, ttl)
    }

    fn now() -> u64 {
        unix_secs()
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn b64_json(v: &serde_json::Value) -> String {
        b64(v.to_string().as_bytes())
    }

    /// An RS256 token over arbitrary header and claims JSON, signed by `k`.
    fn forge_rs256(k: &TestKeys, header: serde_json::Value, claims: serde_json::Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(k.private_pem.as_bytes()).unwrap();
        let input = format!("{}.{}", b64_json(&header), b64_json(&claims));
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::RS256).unwrap();
        format!("{input}.{sig}")
    }

    fn rs_header(kid: &str) -> serde_json::Value {
        serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": kid})
    }

    fn body(uid: u64, ttl: i64) -> serde_json::Value {
        serde_json::to_value(claims(uid, ttl)).unwrap()
    }

    fn rsa_count(v: &JwtVerifier) -> u64 {
        v.rsa_verifications.load(Ordering::Relaxed)
    }

    /// The published key set verifies the tokens its private halves sign,
    /// checked by an independent implementation (jsonwebtoken from n and e).
    #[test]
    fn jwks_publishes_each_key_so_others_can_verify() {
        let v = verifier_with(&[keys(), next_key()], 5);
        let set = v.jwks()["keys"].as_array().unwrap().clone();
        let kids: Vec<_> = set.iter().map(|k| k["kid"].as_str().unwrap()).collect();
        assert_eq!(kids, ["test-1", "test-2"]);
        for (jwk, key) in set.iter().zip([keys(), next_key()]) {
            assert_eq!(jwk["kty"], "RSA");
            assert_eq!(jwk["alg"], "RS256");
            assert_eq!(jwk["use"], "sig");
            assert!(jwk.get("d").is_none(), "no private part");
            let token = key.mint(&claims(7, 60));
            let decoding = jsonwebtoken::DecodingKey::from_rsa_components(
                jwk["n"].as_str().unwrap(),
                jwk["e"].as_str().unwrap(),
            )
            .unwrap();
            let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
            validation.set_issuer(&[ISS]);
            validation.set_audience(&[AUD]);
            jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation)
                .expect("a token of this key verifies with its JWK");
            let other = if key.kid == "test-1" {
                next_key()
            } else {
                keys()
            };
            let foreign = other.mint(&claims(7, 60));
            assert!(
                jsonwebtoken::decode::<serde_json::Value>(&foreign, &decoding, &validation)
                    .is_err()
            );
        }
    }

    #[test]
    fn verifier_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<JwtVerifier>();
        assert_send_sync::<Arc<JwtVerifier>>();
    }

    #[test]
    fn valid_token_passes_and_names_the_user() {
        let v = verifier();
        let c = v.verify(&keys().mint(&claims(42, 600))).expect("valid");
        assert_eq!(c.user_id(), Some(42));
        assert_eq!(c.iss, ISS);
        assert_eq!(c.aud, AUD);
        assert_eq!(c.username, "user42");
    }

    #[test]
    fn expired_token_is_rejected() {
        let v = verifier();
        assert_eq!(
            v.verify(&keys().mint(&claims(1, -60))),
            Err(JwtRejection::Expired)
        );
    }

    #[test]
    fn future_nbf_is_rejected() {
        let v = verifier();
        let mut c = claims(1, 600);
        c.nbf = now() + 60;
        assert_eq!(v.verify(&keys().mint(&c)), Err(JwtRejection::NotYetValid));
    }

    #[test]
    fn leeway_is_five_seconds_at_most() {
        let v = verifier();
        assert_eq!(
            v.verify(&keys().mint(&claims(1, -6))),
            Err(JwtRejection::Expired)
        );
        assert!(v.verify(&keys().mint(&claims(1, -3))).is_ok());

        // Asking for more leeway than the contract allows gets 5 s.
        let wide = verifier_with(&[keys()], 3_600);
        assert_eq!(wide.leeway_secs, MAX_LEEWAY_SECS);
        assert_eq!(
            wide.verify(&keys().mint(&claims(1, -6))),
            Err(JwtRejection::Expired)
        );
    }

    #[test]
    fn zero_leeway_is_strict() {
        let v = verifier_with(&[keys()], 0);
        assert_eq!(
            v.verify(&keys().mint(&claims(1, -2))),
            Err(JwtRejection::Expired)
        );
    }

    #[test]
    fn other_key_with_same_kid_is_bad_signature() {
        let v = verifier();
        assert_eq!(impostor().kid, keys().kid);
        assert_eq!(
            v.verify(&impostor().mint(&claims(1, 600))),
            Err(JwtRejection::BadSignature)
        );
    }

    #[test]
    fn alg_none_is_wrong_algorithm() {
        let v = verifier();
        let header = serde_json::json!({"alg": "none", "typ": "JWT", "kid": keys().kid});
        let token = format!("{}.{}.", b64_json(&header), b64_json(&body(1, 600)));
        assert_eq!(v.verify(&token), Err(JwtRejection::WrongAlgorithm));
        assert_eq!(rsa_count(&v), 0, "refused before any key was used");
        // Also with a garbage signature, and with no alg at all.
        let token = format!("{}.{}.c2ln", b64_json(&header), b64_json(&body(1, 600)));
        assert_eq!(v.verify(&token), Err(JwtRejection::WrongAlgorithm));
        let header = serde_json::json!({"typ": "JWT", "kid": keys().kid});
        let token = format!("{}.{}.", b64_json(&header), b64_json(&body(1, 600)));
        assert_eq!(v.verify(&token), Err(JwtRejection::WrongAlgorithm));
    }

    #[test]
    fn hs256_with_public_key_as_secret_is_wrong_algorithm() {
        let v = verifier();
        let header = serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": keys().kid});
        let secret = jsonwebtoken::EncodingKey::from_secret(keys().public_pem.as_bytes());
        let input = format!("{}.{}", b64_json(&header), b64_json(&body(1, 600)));
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &secret, Algorithm::HS256).unwrap();
        let token = format!("{input}.{sig}");
        assert_eq!(v.verify(&token), Err(JwtRejection::WrongAlgorithm));
        assert_eq!(rsa_count(&v), 0);
    }

    #[test]
    fn other_rsa_algorithms_are_wrong_algorithm() {
        let v = verifier();
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(keys().private_pem.as_bytes()).unwrap();
        for alg in [Algorithm::RS512, Algorithm::RS384, Algorithm::PS256] {
            let mut header = jsonwebtoken::Header::new(alg);
            header.kid = Some(keys().kid.clone());
            let token = jsonwebtoken::encode(&header, &claims(1, 600), &key).unwrap();
            assert_eq!(
                v.verify(&token),
                Err(JwtRejection::WrongAlgorithm),
                "{alg:?}"
            );
        }
        // Case matters: "rs256" is not RS256.
        let token = forge_rs256(
            keys(),
            serde_json::json!({"alg": "rs256", "kid": keys().kid}),
            body(1, 600),
        );
        assert_eq!(v.verify(&token), Err(JwtRejection::WrongAlgorithm));
    }

    #[test]
    fn tampered_payload_is_bad_signature() {
        let v = verifier();
        let token = keys().mint(&claims(1, 600));
        let parts: Vec<&str> = token.split('.').collect();
        let mut c = body(1, 600);
        c["sub"] = "2".into();
        let tampered = format!("{}.{}.{}", parts[0], b64_json(&c), parts[2]);
        assert_eq!(v.verify(&tampered), Err(JwtRejection::BadSignature));
        // A flipped signature byte too.
        let mut sig = parts[2].to_string();
        let last = if sig.ends_with('A') { "B" } else { "A" };
        sig.replace_range(sig.len() - 1.., last);
        let flipped = format!("{}.{}.{sig}", parts[0], parts[1]);
        assert!(v.verify(&flipped).is_err());
        // Stripping the signature.
        let stripped = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(v.verify(&stripped), Err(JwtRejection::BadSignature));
    }

    #[test]
    fn unknown_and_hostile_kids_are_unknown_key() {
        let v = verifier();
        for kid in [
            "nope",
            "../../etc/passwd",
            "/etc/passwd",
            "test-1\0",
            "TEST-1",
            "",
        ] {
            let token = forge_rs256(keys(), rs_header(kid), body(1, 600));
            assert_eq!(v.verify(&token), Err(JwtRejection::UnknownKey), "{kid:?}");
        }
        assert_eq!(rsa_count(&v), 0, "no key was looked up on disk or used");
    }

    #[test]
    fn missing_or_non_string_kid_is_unknown_key() {
        let v = verifier();
        let token = forge_rs256(
            keys(),
            serde_json::json!({"alg": "RS256", "typ": "JWT"}),
            body(1, 600),
        );
        assert_eq!(v.verify(&token), Err(JwtRejection::UnknownKey));
        let token = forge_rs256(
            keys(),
            serde_json::json!({"alg": "RS256", "kid": 1}),
            body(1, 600),
        );
        assert_eq!(v.verify(&token), Err(JwtRejection::UnknownKey));
    }

    #[test]
    fn crit_header_is_malformed() {
        let v = verifier();
        let header = serde_json::json!({"alg": "RS256", "kid": keys().kid, "crit": ["exp"]});
        let token = forge_rs256(keys(), header, body(1, 600));
        assert_eq!(v.verify(&token), Err(JwtRejection::Malformed));
    }

    #[test]
    fn every_required_claim_is_required() {
        let v = verifier();
        for claim in ["exp", "nbf", "iss", "aud", "sub", "iat"] {
            let mut c = body(1, 600);
            c.as_object_mut().unwrap().remove(claim);
            let token = forge_rs256(keys(), rs_header(&keys().kid), c);
            assert_eq!(v.verify(&token), Err(JwtRejection::MissingClaim), "{claim}");
        }
        // username is optional.
        let mut c = body(1, 600);
        c.as_object_mut().unwrap().remove("username");
        let token = forge_rs256(keys(), rs_header(&keys().kid), c);
        assert_eq!(v.verify(&token).unwrap().username, "");
    }

    #[test]
    fn wrong_issuer_and_audience_are_rejected() {
        let v = verifier();
        let mut c = claims(1, 600);
        c.iss = "someone-else".into();
        assert_eq!(v.verify(&keys().mint(&c)), Err(JwtRejection::WrongIssuer));
        let mut c = claims(1, 600);
        c.aud = "other-audience".into();
        assert_eq!(v.verify(&keys().mint(&c)), Err(JwtRejection::WrongAudience));
        // An audience list, even one containing ours, is not our audience.
        let mut c = body(1, 600);
        c["aud"] = serde_json::json!([AUD, "other"]);
        let token = forge_rs256(keys(), rs_header(&keys().kid), c);
        assert!(v.verify(&token).is_err());
    }

    #[test]
    fn bad_subjects_are_rejected() {
        let v = verifier();
        for sub in ["0", "-1", "abc", "", "1.5"] {
            let mut c = claims(1, 600);
            c.sub = sub.into();
            assert_eq!(
                v.verify(&keys().mint(&c)),
                Err(JwtRejection::BadSubject),
                "{sub:?}"
            );
        }
    }

    #[test]
    fn wrongly_typed_claims_are_malformed() {
        let v = verifier();
        // A text `exp` is no time at all.
        let mut c = body(1, 600);
        c["exp"] = "tomorrow".into();
        let token = forge_rs256(keys(), rs_header(&keys().kid), c);
        assert_eq!(v.verify(&token), Err(JwtRejection::Malformed));
        // Nor is a float `exp`: the claims are integers.
        let mut c = body(1, 600);
        c["exp"] = serde_json::json!(now() as f64 + 600.5);
        let token = forge_rs256(keys(), rs_header(&keys().kid), c);
        assert_eq!(v.verify(&token), Err(JwtRejection::Malformed));
        let token = forge_rs256(keys(), rs_header(&keys().kid), serde_json::json!([1, 2]));
        assert_eq!(v.verify(&token), Err(JwtRejection::Malformed));
    }

    #[test]
    fn garbage_is_malformed() {
        let v = verifier();
        let big = "a".repeat(10 * 1024);
        let too_long = format!("{}.{}.x", b64_json(&rs_header("test-1")), "a".repeat(9000));
        for token in [
            "",
            "a.b",
            "not a token",
            "not-a-token",
            "a.b.c",
            "a.b.c.d",
            "...",
            "ü.ö.ä",
            big.as_str(),
            too_long.as_str(),
        ] {
            assert_eq!(
                v.verify(token),
                Err(JwtRejection::Malformed),
                "{:?}",
                &token[..token.len().min(20)]
            );
        }
        // A valid header on a payload that is not base64 or not JSON.
        let h = b64_json(&rs_header(&keys().kid));
        for token in [
            format!("{h}.!!!.abc"),
            format!("{h}.{}.abc", b64(b"not json")),
        ] {
            assert!(v.verify(&token).is_err(), "{token}");
        }
        assert!(rsa_count(&v) <= 2);
    }

    #[test]
    fn rotation_accepts_both_keys() {
        let v = verifier_with(&[keys(), next_key()], 5);
        let a = v.verify(&keys().mint(&claims(1, 600))).unwrap();
        let b = v.verify(&next_key().mint(&claims(2, 600))).unwrap();
        assert_eq!((a.user_id(), b.user_id()), (Some(1), Some(2)));
        // The kid picks the key: a token signed by key 2 but naming key 1 fails.
        let token = forge_rs256(next_key(), rs_header(&keys().kid), body(3, 600));
        assert_eq!(v.verify(&token), Err(JwtRejection::BadSignature));
    }

    #[test]
    fn cache_skips_rsa_on_repeat() {
        let v = verifier();
        let token = keys().mint(&claims(7, 600));
        let first = v.verify(&token).unwrap();
        assert_eq!(rsa_count(&v), 1);
        let second = v.verify(&token).unwrap();
        assert_eq!(rsa_count(&v), 1, "second verify was a cache hit");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(v.cache_len(), 1);
    }

    #[test]
    fn failures_are_not_cached() {
        let v = verifier();
        let mut c = claims(1, 600);
        c.iss = "someone-else".into();
        let token = keys().mint(&c);
        assert!(v.verify(&token).is_err());
        assert!(v.verify(&token).is_err());
        assert_eq!(rsa_count(&v), 2);
        assert_eq!(v.cache_len(), 0);
    }

    #[test]
    fn cached_token_that_expired_is_rejected() {
        let v = verifier();
        let token = keys().mint(&claims(9, 60));
        assert!(v.verify(&token).is_ok());
        assert_eq!(v.cache_len(), 1);
        // Age the verifier's clock past exp + leeway; the cache entry is
        // still there (entries are not dropped at exp: each hit checks).
        v.clock_offset_secs.store(60 + 6, Ordering::Relaxed);
        assert_eq!(v.verify(&token), Err(JwtRejection::Expired));
        assert_eq!(rsa_count(&v), 1, "rejected from the cache entry itself");
        // Inside the leeway it is still fine (fresh verify against real time).
        v.clock_offset_secs.store(0, Ordering::Relaxed);
        assert!(v.verify(&token).is_ok());
        v.clock_offset_secs.store(60 + 4, Ordering::Relaxed);
        assert!(v.verify(&token).is_ok());
    }

    #[test]
    fn disabled_cache_still_verifies() {
        let pems = vec![(keys().kid.clone(), keys().public_pem.clone().into_bytes())];
        let v = JwtVerifier::new(&pems, ISS, AUD, 5, 0).unwrap();
        let token = keys().mint(&claims(1, 600));
        assert!(v.verify(&token).is_ok());
        assert!(v.verify(&token).is_ok());
        assert_eq!(rsa_count(&v), 2);
        assert_eq!(v.cache_len(), 0);
    }

    #[test]
    fn verify_header_parses_bearer() {
        let v = verifier();
        let token = keys().mint(&claims(5, 600));
        for value in [
            format!("Bearer {token}"),
            format!("bearer {token}"),
            format!("BEARER  {token} "),
            format!("Bearer\t{token}"),
        ] {
            assert_eq!(
                v.verify_header(Some(&value)).unwrap().user_id(),
                Some(5),
                "{value}"
            );
        }
        assert_eq!(v.verify_header(None), Err(JwtRejection::Missing));
        assert_eq!(
            v.verify_header(Some(&format!("Basic {token}"))),
            Err(JwtRejection::Missing)
        );
        assert_eq!(v.verify_header(Some("")), Err(JwtRejection::Missing));
        assert_eq!(
            v.verify_header(Some("Bearer")),
            Err(JwtRejection::Malformed)
        );
        assert_eq!(
            v.verify_header(Some("Bearer   ")),
            Err(JwtRejection::Malformed)
        );
        assert_eq!(v.verify_header(Some("Bearerx")), Err(JwtRejection::Missing));
        assert_eq!(
            v.verify_header(Some("Bearer x")),
            Err(JwtRejection::Malformed)
        );
        assert_eq!(
            v.verify_header(Some(&format!("Bearer {token} extra"))),
            Err(JwtRejection::Malformed)
        );
    }

    #[test]
    fn reasons_and_details_are_header_safe() {
        use JwtRejection::*;
        let all = [
            Missing,
            Malformed,
            UnknownKey,
            WrongAlgorithm,
            BadSignature,
            Expired,
            NotYetValid,
            WrongIssuer,
            WrongAudience,
            MissingClaim,
            BadSubject,
        ];
        let mut seen = std::collections::HashSet::new();
        for r in all {
            assert!(seen.insert(r.reason()), "duplicate {}", r.reason());
            assert!(r
                .reason()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_'));
            assert!(!r.detail().contains(['"', '\\', '\r', '\n']));
            assert_eq!(r.to_string(), r.detail());
        }
        assert_eq!(Expired.reason(), "expired");
    }

    #[test]
    fn from_config_reads_spki_and_pkcs1_files() {
        use rsa::pkcs1::EncodeRsaPublicKey;
        let dir = tempfile::tempdir().unwrap();
        let spki = keys().write_public(dir.path());
        let pkcs1 = dir.path().join("test-2.pkcs1.pem");
        let pub2 = RsaPublicKey::from_public_key_pem(&next_key().public_pem).unwrap();
        std::fs::write(
            &pkcs1,
            pub2.to_pkcs1_pem(rsa::pkcs8::LineEnding::CRLF).unwrap(),
        )
        .unwrap();
        let config = JwtConfig {
            issuer: ISS.into(),
            audience: AUD.into(),
            leeway_secs: 5,
            public_keys: vec![
                crate::config::PublicKeyConfig {
                    kid: keys().kid.clone(),
                    path: spki,
                },
                crate::config::PublicKeyConfig {
                    kid: next_key().kid.clone(),
                    path: pkcs1,
                },
            ],
            ..JwtConfig::default()
        };
        let v = JwtVerifier::from_config(&config, 10).unwrap();
        assert!(v.verify(&keys().mint(&claims(1, 600))).is_ok());
        assert!(v.verify(&next_key().mint(&claims(2, 600))).is_ok());
        assert!(format!("{v:?}").contains("test-2"));
    }

    #[test]
    fn setup_errors_name_kid_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.pem");
        let config = JwtConfig {
            public_keys: vec![crate::config::PublicKeyConfig {
                kid: "k-missing".into(),
                path: missing.clone(),
            }],
            ..JwtConfig::default()
        };
        let err = JwtVerifier::from_config(&config, 10).unwrap_err();
        assert!(matches!(err, JwtSetupError::Read { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("k-missing") && msg.contains("absent.pem"),
            "{msg}"
        );

        let private = dir.path().join("private.pem");
        std::fs::write(&private, &keys().private_pem).unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "hello").unwrap();
        for (kid, path) in [("k-private", private), ("k-garbage", garbage)] {
            let config = JwtConfig {
                public_keys: vec![crate::config::PublicKeyConfig {
                    kid: kid.into(),
                    path: path.clone(),
                }],
                ..JwtConfig::default()
            };
            let err = JwtVerifier::from_config(&config, 10).unwrap_err();
            assert!(matches!(err, JwtSetupError::Key { .. }), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains(kid) && msg.contains(&*path.to_string_lossy()),
                "{msg}"
            );
        }
    }

    fn verify_key(k: &TestKeys) -> VerifyKey {
        VerifyKey::from_pem(&k.kid, "test", k.public_pem.as_bytes()).unwrap()
    }

    /// A rotation reaches a running verifier: the new kid verifies once the
    /// set is replaced, with no new verifier and no restart.
    #[test]
    fn a_replaced_key_set_verifies_the_new_kid() {
        let v = verifier();
        let fresh = next_key().mint(&claims(5, 60));
        assert_eq!(v.verify(&fresh).unwrap_err(), JwtRejection::UnknownKey);
        let change = v
            .replace_keys(vec![verify_key(keys()), verify_key(next_key())])
            .unwrap();
        assert_eq!(change.added, ["test-2"]);
        assert!(change.removed.is_empty());
        assert_eq!(v.verify(&fresh).unwrap().user_id(), Some(5));
        assert!(v.knows_kid("test-2"));
        assert_eq!(v.kids(), ["test-1", "test-2"]);
        let unchanged = v
            .replace_keys(vec![verify_key(keys()), verify_key(next_key())])
            .unwrap();
        assert!(unchanged.is_empty());
    }

    /// Withdrawing a key must stop its tokens at once, even the ones the
    /// cache already holds.
    #[test]
    fn a_withdrawn_key_stops_its_cached_tokens() {
        let v = verifier_with(&[keys(), next_key()], 5);
        let old = keys().mint(&claims(1, 60));
        let new = next_key().mint(&claims(2, 60));
        v.verify(&old).unwrap();
        v.verify(&new).unwrap();
        let change = v.replace_keys(vec![verify_key(next_key())]).unwrap();
        assert_eq!(change.removed, ["test-1"]);
        assert_eq!(v.verify(&old).unwrap_err(), JwtRejection::UnknownKey);
        assert!(v.verify(&new).is_ok());
        // Another key under a known kid is a withdrawal too.
        let swapped =
            VerifyKey::from_pem("test-2", "test", impostor().public_pem.as_bytes()).unwrap();
        let change = v.replace_keys(vec![swapped]).unwrap();
        assert_eq!(
            (change.added, change.removed),
            (vec!["test-2".to_string()], vec!["test-2".to_string()])
        );
        assert_eq!(v.verify(&new).unwrap_err(), JwtRejection::BadSignature);
    }

    #[test]
    fn a_bad_replacement_keeps_the_current_keys() {
        let v = verifier();
        assert!(matches!(v.replace_keys(vec![]), Err(JwtSetupError::NoKeys)));
        assert!(matches!(
            v.replace_keys(vec![verify_key(keys()), verify_key(keys())]),
            Err(JwtSetupError::DuplicateKid { .. })
        ));
        assert!(v.verify(&keys().mint(&claims(3, 60))).is_ok());
    }

    #[test]
    fn setup_rejects_bad_key_sets() {
        let pem = keys().public_pem.clone().into_bytes();
        assert!(matches!(
            JwtVerifier::new(&[], ISS, AUD, 5, 10),
            Err(JwtSetupError::NoKeys)
        ));
        let dup = vec![
            ("a".to_string(), pem.clone()),
            ("a".to_string(), pem.clone()),
        ];
        assert!(matches!(
            JwtVerifier::new(&dup, ISS, AUD, 5, 10),
            Err(JwtSetupError::DuplicateKid { .. })
        ));
        let one = vec![("a".to_string(), pem.clone())];
        assert!(matches!(
            JwtVerifier::new(&one, "", AUD, 5, 10),
            Err(JwtSetupError::EmptySetting(_))
        ));
        assert!(matches!(
            JwtVerifier::new(&one, ISS, "", 5, 10),
            Err(JwtSetupError::EmptySetting(_))
        ));
        let empty_kid = vec![(String::new(), pem)];
        assert!(matches!(
            JwtVerifier::new(&empty_kid, ISS, AUD, 5, 10),
            Err(JwtSetupError::EmptyKid { .. })
        ));
        // A 1024-bit key is refused.
        use rsa::pkcs8::EncodePublicKey;
        let small = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
        let small_pem = small
            .to_public_key()
            .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap();
        let err =
            JwtVerifier::new(&[("s".into(), small_pem.into_bytes())], ISS, AUD, 5, 10).unwrap_err();
        assert!(err.to_string().contains("1024 bits"), "{err}");
    }
}

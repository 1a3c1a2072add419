//! Issuing access tokens: RS256 JWTs signed with the private key that only
//! the api (and the ops CLI, for load-test users) holds. The gateway checks
//! them with the public key alone.

use std::path::Path;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use seckill_contracts::claims::AccessClaims;
use seckill_contracts::config::JwtConfig;

/// Why the signer could not be built or sign.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading private key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("private key {path} is not an RSA PEM key: {source}")]
    Key {
        path: String,
        source: jsonwebtoken::errors::Error,
    },
    #[error("signing: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Signs access tokens for one issuer/audience with one key id.
pub struct TokenSigner {
    key: EncodingKey,
    kid: String,
    issuer: String,
    audience: String,
    ttl_secs: u64,
}

impl TokenSigner {
    /// Reads `jwt.private_key_path`; the token header carries `jwt.signing_kid`.
    pub fn from_config(config: &JwtConfig) -> Result<TokenSigner, TokenError> {
        let path = config.private_key_path.display().to_string();
        let pem = std::fs::read(Path::new(&config.private_key_path)).map_err(|source| {
            TokenError::Read {
                path: path.clone(),
                source,
            }
        })?;
        let key =
            EncodingKey::from_rsa_pem(&pem).map_err(|source| TokenError::Key { path, source })?;
        Ok(Self::with_key(config, &config.signing_kid, key))
    }

    /// A signer for the PEM private key of `kid` (a keyring key).
    pub fn from_pem(config: &JwtConfig, kid: &str, pem: &[u8]) -> Result<TokenSigner, TokenError> {
        let key = EncodingKey::from_rsa_pem(pem).map_err(|source| TokenError::Key {
            path: format!("{kid}.private.pem"),
            source,
        })?;
        Ok(Self::with_key(config, kid, key))
    }

    fn with_key(config: &JwtConfig, kid: &str, key: EncodingKey) -> TokenSigner {
        TokenSigner {
            key,
            kid: kid.to_string(),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            ttl_secs: config.ttl_secs,
        }
    }

    /// The kid issued tokens carry.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Token lifetime in seconds (`expires_in` of a login answer).
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// A token for `user_id`, valid from now for the configured lifetime.
    pub fn issue(&self, user_id: u64, username: &str) -> Result<String, TokenError> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = AccessClaims {
            sub: user_id.to_string(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            exp: now + self.ttl_secs,
            nbf: now,
            iat: now,
            username: username.to_string(),
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seckill_contracts::config::PublicKeyConfig;

    #[test]
    fn issued_tokens_verify_with_the_public_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let keys = crate::signing_keys::generate(dir.path(), "k1", false).unwrap();
        let config = JwtConfig {
            signing_kid: "k1".into(),
            private_key_path: keys.private_key.clone(),
            public_keys: vec![PublicKeyConfig {
                kid: "k1".into(),
                path: keys.public_key.clone(),
            }],
            ..JwtConfig::default()
        };
        let signer = TokenSigner::from_config(&config).unwrap();
        let token = signer.issue(42, "alice").unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(header.kid.as_deref(), Some("k1"));
        let public = std::fs::read(&keys.public_key).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&[config.audience.as_str()]);
        let data = jsonwebtoken::decode::<AccessClaims>(
            &token,
            &jsonwebtoken::DecodingKey::from_rsa_pem(&public).unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims.user_id(), Some(42));
        assert_eq!(data.claims.exp - data.claims.iat, config.ttl_secs);
    }

    #[test]
    fn missing_or_bad_key_is_a_clear_error() {
        let mut config = JwtConfig {
            private_key_path: "/nonexistent/key.pem".into(),
            ..JwtConfig::default()
        };
        assert!(matches!(
            TokenSigner::from_config(&config),
            Err(TokenError::Read { .. })
        ));
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "not a key").unwrap();
        config.private_key_path = f.path().to_path_buf();
        assert!(matches!(
            TokenSigner::from_config(&config),
            Err(TokenError::Key { .. })
        ));
    }
}

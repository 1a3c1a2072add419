//! The access token's claims: what the api signs and the gateway (and the
//! api again, defence in depth) verifies. One struct so both sides agree on
//! names and types.

use serde::{Deserialize, Serialize};

/// Claims of an RS256 access token.
///
/// `sub` is the user id in decimal (JWT subjects are strings); use
/// [`AccessClaims::user_id`] to read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Not before, Unix seconds.
    pub nbf: u64,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Display name, for logs and rules; never used for authorization.
    #[serde(default)]
    pub username: String,
}

impl AccessClaims {
    /// The user id, when `sub` is a positive decimal integer.
    pub fn user_id(&self) -> Option<u64> {
        self.sub.parse::<u64>().ok().filter(|id| *id > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_parses_only_positive_decimals() {
        let mut c = AccessClaims {
            sub: "42".into(),
            iss: "i".into(),
            aud: "a".into(),
            exp: 0,
            nbf: 0,
            iat: 0,
            username: String::new(),
        };
        assert_eq!(c.user_id(), Some(42));
        for bad in ["0", "-1", "x", "", "1e3"] {
            c.sub = bad.into();
            assert_eq!(c.user_id(), None, "{bad}");
        }
    }
}

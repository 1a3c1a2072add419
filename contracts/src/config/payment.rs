//! The `[wallet]` and `[payment]` sections: where the wallet service keeps
//! money (its own database, which nothing else opens) and how the api pays
//! an order across the two databases.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// The wallet service (`seckill-wallet`, one or more instances).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WalletConfig {
    /// Overridden per instance (`--listen` or `SECKILL__WALLET__LISTEN`).
    pub listen: SocketAddr,
    /// The wallet's own database (`seckill_wallet`); only the wallet
    /// service connects to it.
    pub database_url: String,
    pub max_connections: u32,
    /// `xa` mode: how long an instance keeps a prepared branch's
    /// connection waiting for phase two. After that it lets the branch go
    /// (it stays prepared) so that any instance, or recovery, can end it.
    pub xa_hold_ms: u64,
    /// Connections the kernel queues before the wallet accepts them (see
    /// `api.listen_backlog`).
    pub listen_backlog: u32,
}

impl Default for WalletConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8083).into(),
            database_url: "mysql://root@127.0.0.1:3306/seckill_wallet".into(),
            max_connections: 16,
            xa_hold_ms: 5_000,
            listen_backlog: 4096,
        }
    }
}

/// How a payment keeps the order and the wallet databases consistent.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PaymentMode {
    /// Try / Confirm / Cancel on both sides, with a fence on each.
    Tcc,
    /// Two-phase commit with MariaDB XA branches in both databases.
    Xa,
    /// The wallet debits with an outbox message in one local transaction;
    /// the order side settles on the message (pay answers 202).
    Message,
}

impl PaymentMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentMode::Tcc => "tcc",
            PaymentMode::Xa => "xa",
            PaymentMode::Message => "message",
        }
    }
}

impl std::str::FromStr for PaymentMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcc" => Ok(PaymentMode::Tcc),
            "xa" => Ok(PaymentMode::Xa),
            "message" => Ok(PaymentMode::Message),
            other => Err(format!("unknown payment mode {other:?}")),
        }
    }
}

/// The api's side of paying (it coordinates).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PaymentConfig {
    /// One mode per deployment.
    pub mode: PaymentMode,
    /// The wallet instances, tried in turn when one does not answer.
    pub wallet_urls: Vec<String>,
    /// The shared secret the api presents on the wallet's internal routes
    /// (by path, or the value from the environment).
    pub service_token_path: Option<PathBuf>,
    pub service_token: Option<String>,
    /// One call to a wallet instance, connect included.
    pub wallet_timeout_ms: u64,
    /// A payment transaction still open after this long is driven to its
    /// end by the recovery loop (one api at a time).
    pub transaction_timeout_ms: u64,
    /// How often the recovery loop looks for such transactions.
    pub recovery_interval_ms: u64,
    /// `message` mode: how often an outbox relay looks for messages it
    /// was not woken for (a crash between commit and publish).
    pub relay_interval_ms: u64,
    /// `message` mode: published outbox rows and the record of consumed
    /// messages are deleted this long after (a message is acked long
    /// before; the log's state dedupes any later repeat anyway).
    pub message_retention_secs: u64,
    /// Payment steps of concurrent payments run together, up to this many
    /// in one local transaction (group commit; 1 runs each alone). The api
    /// groups the order branch's steps and the log's, the wallet its own.
    /// A group costs the database about the same whatever its size (its
    /// steps run as set statements), so fewer, larger groups cost less
    /// per payment: on 2 cores 128 × 1 took half of MariaDB's CPU per TCC
    /// payment that 64 × 2 took (README, "One larger group at a time").
    /// The api also sends its payments' wallet calls in batches this
    /// large, and runs XA payments in groups this large; at most
    /// [`GROUP_COMMIT_MAX_LIMIT`].
    pub group_commit_max: u32,
    /// Groups in the database at once, per api or wallet instance and per
    /// step (and batches of wallet calls, and XA groups); each holds a
    /// connection of its pool while it runs. One is enough where no step
    /// waits long on a lock: TCC and message hold rows only inside their
    /// short local transactions, and XA groups skip rows held elsewhere.
    pub group_commits_in_flight: u32,
}

/// The largest `payment.group_commit_max`: a batch of that many wallet
/// calls (about 150 bytes each as JSON) stays well inside the services'
/// 64 KiB request bodies.
pub const GROUP_COMMIT_MAX_LIMIT: u32 = 256;

impl Default for PaymentConfig {
    fn default() -> Self {
        Self {
            mode: PaymentMode::Tcc,
            wallet_urls: vec!["http://127.0.0.1:8083".into()],
            service_token_path: Some("var/keys/service-token".into()),
            service_token: None,
            wallet_timeout_ms: 2_000,
            transaction_timeout_ms: 10_000,
            recovery_interval_ms: 1_000,
            relay_interval_ms: 500,
            message_retention_secs: 86_400,
            group_commit_max: 128,
            group_commits_in_flight: 1,
        }
    }
}

impl PaymentConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.wallet_urls.is_empty() {
            return Err(invalid("payment.wallet_urls", "at least one is required"));
        }
        for (i, url) in self.wallet_urls.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    format!("payment.wallet_urls[{i}]"),
                    "must be an http:// or https:// address",
                ));
            }
        }
        for (key, value) in [
            ("wallet_timeout_ms", self.wallet_timeout_ms),
            ("recovery_interval_ms", self.recovery_interval_ms),
            ("relay_interval_ms", self.relay_interval_ms),
            ("message_retention_secs", self.message_retention_secs),
            ("group_commit_max", u64::from(self.group_commit_max)),
            (
                "group_commits_in_flight",
                u64::from(self.group_commits_in_flight),
            ),
        ] {
            if value == 0 {
                return Err(invalid(format!("payment.{key}"), "must be at least 1"));
            }
        }
        if self.group_commit_max > GROUP_COMMIT_MAX_LIMIT {
            return Err(invalid(
                "payment.group_commit_max",
                format!(
                    "must be at most {GROUP_COMMIT_MAX_LIMIT}: a batch of wallet calls is one \
                     request body"
                ),
            ));
        }
        if self.transaction_timeout_ms <= self.wallet_timeout_ms {
            return Err(invalid(
                "payment.transaction_timeout_ms",
                "must be longer than payment.wallet_timeout_ms, or recovery would end \
                 transactions whose calls are still running",
            ));
        }
        Ok(())
    }
}

impl WalletConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.database_url.is_empty() {
            return Err(invalid("wallet.database_url", "must not be empty"));
        }
        if self.max_connections == 0 {
            return Err(invalid("wallet.max_connections", "must be at least 1"));
        }
        if self.xa_hold_ms == 0 {
            return Err(invalid("wallet.xa_hold_ms", "must be at least 1"));
        }
        if self.listen_backlog == 0 {
            return Err(invalid("wallet.listen_backlog", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_validate() {
        PaymentConfig::default().validate().unwrap();
        WalletConfig::default().validate().unwrap();
    }

    #[test]
    fn recovery_never_outruns_a_wallet_call() {
        let c = PaymentConfig {
            transaction_timeout_ms: 2_000,
            wallet_timeout_ms: 2_000,
            ..PaymentConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("payment.transaction_timeout_ms"), "{err}");
    }

    #[test]
    fn a_group_fits_one_request_body() {
        let at = |max| PaymentConfig {
            group_commit_max: max,
            ..PaymentConfig::default()
        };
        at(GROUP_COMMIT_MAX_LIMIT).validate().unwrap();
        let err = at(GROUP_COMMIT_MAX_LIMIT + 1)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("payment.group_commit_max"), "{err}");
    }

    #[test]
    fn wallet_urls_must_be_http() {
        let c = PaymentConfig {
            wallet_urls: vec!["wallet:8083".into()],
            ..PaymentConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("wallet_urls[0]"));
        let modes: Vec<PaymentMode> = serde_json::from_str(r#"["tcc", "xa", "message"]"#).unwrap();
        assert_eq!(
            modes,
            vec![PaymentMode::Tcc, PaymentMode::Xa, PaymentMode::Message]
        );
        assert_eq!("xa".parse::<PaymentMode>(), Ok(PaymentMode::Xa));
        assert!(serde_json::from_str::<PaymentMode>(r#""2pc""#).is_err());
    }
}

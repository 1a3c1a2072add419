//! The api's client of the wallet service's internal routes: the service
//! token on every call, a time limit per call (`payment.wallet_timeout_ms`),
//! and the next instance of `payment.wallet_urls` when one does not answer.
//! Moving to another instance is safe because every branch call is fenced
//! (a repeat does nothing twice).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use seckill_contracts::config::{read_secret, Config};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::payments::fence::EndOutcome;
use crate::wallet::accounts::{Wallet, WalletFigures};
use crate::wallet::message::{DebitOutcome, Resolution};
use crate::wallet::routes::{
    BatchAnswer, EndRequest, ItemAnswer, Outcome, PrepareRequest, TryRequest,
};
use crate::wallet::tcc::TryOutcome;
use crate::wallet::xa::{PrepareOutcome, Prepared};

/// Why a wallet call did not get an answer it could use.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WalletCallError {
    /// No instance answered (down, timed out, 5xx): the call may or may
    /// not have taken effect.
    #[error("no wallet instance answered: {0}")]
    Unavailable(String),
    /// An instance refused the call (4xx): it took no effect.
    #[error("the wallet refused the call ({status}): {detail}")]
    Refused { status: u16, detail: String },
}

/// The answers to a batch: one per item, or the error of the whole call.
pub type Answers<O> = Result<Vec<Result<O, WalletCallError>>, WalletCallError>;

/// The one answer of a batch of one.
fn only<O>(answers: Answers<O>) -> Result<O, WalletCallError> {
    let mut answers = answers?;
    match (answers.pop(), answers.is_empty()) {
        (Some(answer), true) => answer,
        _ => Err(WalletCallError::Unavailable(
            "a batch of one answered another number".into(),
        )),
    }
}

/// The group-commit queue's own failure (a group answered for another
/// number of items) reaches a batched wallet call as this.
impl From<sqlx::Error> for WalletCallError {
    fn from(e: sqlx::Error) -> WalletCallError {
        WalletCallError::Unavailable(e.to_string())
    }
}

/// The wallet's internal routes, over HTTP.
pub struct WalletClient {
    http: reqwest::Client,
    urls: Vec<String>,
    token: Option<String>,
    /// The instance that answered last, tried first.
    preferred: AtomicUsize,
}

impl WalletClient {
    /// From `payment.*`; a missing service token makes every call fail
    /// as refused (the wallet would answer 401), with the reason logged.
    pub fn new(config: &Config) -> WalletClient {
        let p = &config.payment;
        let token = read_secret(
            "payment.service_token",
            p.service_token.as_deref(),
            p.service_token_path.as_deref(),
        )
        .inspect_err(|e| tracing::error!(error = %e, "payments disabled: no service token"))
        .ok();
        let timeout = Duration::from_millis(p.wallet_timeout_ms);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .unwrap_or_default();
        WalletClient {
            http,
            urls: p
                .wallet_urls
                .iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect(),
            token,
            preferred: AtomicUsize::new(0),
        }
    }

    /// TCC Try of many payments in one call; one answer per request.
    pub async fn tcc_try_batch(&self, requests: &[TryRequest]) -> Answers<TryOutcome> {
        self.batch("/internal/tcc/try", requests).await
    }

    pub async fn tcc_try(&self, request: &TryRequest) -> Result<TryOutcome, WalletCallError> {
        only(self.tcc_try_batch(std::slice::from_ref(request)).await)
    }

    /// TCC Confirm (`confirm`) or Cancel of many transactions in one call.
    pub async fn tcc_end_batch(&self, confirm: bool, tx_ids: &[String]) -> Answers<EndOutcome> {
        let path = if confirm {
            "/internal/tcc/confirm"
        } else {
            "/internal/tcc/cancel"
        };
        let requests: Vec<EndRequest> = tx_ids
            .iter()
            .map(|t| EndRequest { tx_id: t.clone() })
            .collect();
        self.batch(path, &requests).await
    }

    pub async fn tcc_confirm(&self, tx_id: &str) -> Result<EndOutcome, WalletCallError> {
        only(self.tcc_end_batch(true, &[tx_id.to_string()]).await)
    }

    pub async fn tcc_cancel(&self, tx_id: &str) -> Result<EndOutcome, WalletCallError> {
        only(self.tcc_end_batch(false, &[tx_id.to_string()]).await)
    }

    /// XA phase one: the wallet prepares a group's debits, one branch.
    pub async fn xa_prepare(&self, request: &PrepareRequest) -> Result<Prepared, WalletCallError> {
        let reply: Prepared = self.post("/internal/xa/prepare", request).await?;
        if reply.outcome == PrepareOutcome::Prepared && reply.debits.len() != request.items.len() {
            // It may have prepared something: the group is aborted, and
            // its rollback ends whatever it did.
            return Err(WalletCallError::Unavailable(format!(
                "{} debits answered for {} items",
                reply.debits.len(),
                request.items.len()
            )));
        }
        Ok(reply)
    }

    /// XA phase two (commit) of a group's branch; `Unavailable` too while
    /// another instance still holds it.
    pub async fn xa_commit(&self, tx_id: &str) -> Result<EndOutcome, WalletCallError> {
        self.end("/internal/xa/commit", tx_id).await
    }

    /// XA phase two (rollback).
    pub async fn xa_rollback(&self, tx_id: &str) -> Result<EndOutcome, WalletCallError> {
        self.end("/internal/xa/rollback", tx_id).await
    }

    /// Message mode: debits of many payments in one call, each with its
    /// message in the wallet's outbox.
    pub async fn message_debit_batch(&self, requests: &[TryRequest]) -> Answers<DebitOutcome> {
        self.batch("/internal/message/debit", requests).await
    }

    pub async fn message_debit(
        &self,
        request: &TryRequest,
    ) -> Result<DebitOutcome, WalletCallError> {
        only(
            self.message_debit_batch(std::slice::from_ref(request))
                .await,
        )
    }

    /// Message mode: the check-back on a debit the api did not hear about.
    pub async fn message_resolve(&self, tx_id: &str) -> Result<Resolution, WalletCallError> {
        let request = EndRequest {
            tx_id: tx_id.to_string(),
        };
        let reply: Outcome<Resolution> = self.post("/internal/message/resolve", &request).await?;
        Ok(reply.outcome)
    }

    /// Transaction ids of the wallet branches prepared on the wallet's
    /// database server (recovery keeps those its log knows).
    pub async fn xa_prepared(&self) -> Result<Vec<String>, WalletCallError> {
        self.call(|http, base| http.get(format!("{base}/internal/xa/prepared")))
            .await
    }

    /// A top-up through the admin route (`seckillctl wallet credit`),
    /// with the admin token rather than the service token.
    pub async fn credit(
        &self,
        admin_token: &str,
        user_id: u64,
        amount_cents: i64,
    ) -> Result<Wallet, WalletCallError> {
        let body = serde_json::json!({ "user_id": user_id, "amount_cents": amount_cents });
        self.call_as(admin_token, |http, base| {
            http.post(format!("{base}/admin/wallet/credit")).json(&body)
        })
        .await
    }

    /// The wallet's audit figures.
    pub async fn figures(&self, open_after_ms: u64) -> Result<WalletFigures, WalletCallError> {
        let path = format!("/internal/audit?open_after_ms={open_after_ms}");
        self.call(|http, base| http.get(format!("{base}{path}")))
            .await
    }

    async fn end(&self, path: &str, tx_id: &str) -> Result<EndOutcome, WalletCallError> {
        let request = EndRequest {
            tx_id: tx_id.to_string(),
        };
        let reply: Outcome<EndOutcome> = self.post(path, &request).await?;
        Ok(reply.outcome)
    }

    /// One call carrying `items`; an answer per item, or the call's error.
    async fn batch<B: Serialize, O: DeserializeOwned>(
        &self,
        path: &str,
        items: &[B],
    ) -> Answers<O> {
        #[derive(Serialize)]
        struct Batch<'a, B> {
            items: &'a [B],
        }
        let reply: BatchAnswer<O> = self.post(path, &Batch { items }).await?;
        if reply.answers.len() != items.len() {
            return Err(WalletCallError::Unavailable(format!(
                "{} answers for {} items",
                reply.answers.len(),
                items.len()
            )));
        }
        Ok(reply
            .answers
            .into_iter()
            .map(|a| match a {
                ItemAnswer::Outcome(o) => Ok(o),
                // Like a 500 for a call alone: it may have taken effect.
                ItemAnswer::Error(e) => Err(WalletCallError::Unavailable(e)),
            })
            .collect())
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, WalletCallError> {
        self.call(|http, base| http.post(format!("{base}{path}")).json(body))
            .await
    }

    /// Sends the request `build` makes to each instance in turn, starting
    /// with the one that answered last, until one answers.
    async fn call<R, F>(&self, build: F) -> Result<R, WalletCallError>
    where
        R: DeserializeOwned,
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        let Some(token) = &self.token else {
            return Err(WalletCallError::Refused {
                status: 401,
                detail: "no payment.service_token is configured".into(),
            });
        };
        self.call_as(token, build).await
    }

    /// [`call`](Self::call) with `token` as the bearer.
    async fn call_as<R, F>(&self, token: &str, build: F) -> Result<R, WalletCallError>
    where
        R: DeserializeOwned,
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        let first = self.preferred.load(Ordering::Relaxed);
        let mut last = String::from("no wallet_urls");
        for i in 0..self.urls.len() {
            let at = (first + i) % self.urls.len();
            let sent = build(&self.http, &self.urls[at])
                .bearer_auth(token)
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{}: {e}", self.urls[at]);
                    continue;
                }
            };
            let status = response.status();
            if status.is_server_error() {
                last = format!("{}: {status}", self.urls[at]);
                continue;
            }
            self.preferred.store(at, Ordering::Relaxed);
            return read(response, status).await;
        }
        Err(WalletCallError::Unavailable(last))
    }
}

async fn read<R: DeserializeOwned>(
    response: reqwest::Response,
    status: StatusCode,
) -> Result<R, WalletCallError> {
    if status.is_success() {
        return response
            .json()
            .await
            .map_err(|e| WalletCallError::Unavailable(format!("unreadable answer: {e}")));
    }
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    Err(WalletCallError::Refused {
        status: status.as_u16(),
        detail: body["detail"].as_str().unwrap_or_default().to_string(),
    })
}

//! The api's wallet calls of concurrent payments, sent together: a
//! payment's TCC Try, Confirm and Cancel and the message mode's debit join
//! a queue ([`crate::group_commit`]), and a runner sends whatever is
//! waiting (up to `payment.group_commit_max`) as one call of the wallet's
//! batch route, `group_commits_in_flight` calls of each kind at once.
//!
//! ```text
//!  payment ─▶ queue ─▶ runner ─▶ POST /internal/tcc/try {items} ─▶ one answer per item
//! ```
//!
//! Under a burst each payment's HTTP round trip (a request built, parsed,
//! routed and answered on both sides) was most of what the api and the
//! wallet spent on it; a batch pays for one. Each payment still gets its
//! own answer and runs its own steps and fail points: a batch changes how
//! calls travel, not what they do. A call that fails whole (the wallet
//! down, a timeout) is that failure for each of its payments, never sent
//! again item by item.

use std::future::Future;
use std::sync::Arc;

use super::fence::EndOutcome;
use super::wallet_client::{Answers, WalletCallError, WalletClient};
use crate::group_commit::{GroupCommit, GroupLimits, RunGroup};
use crate::wallet::message::DebitOutcome;
use crate::wallet::routes::TryRequest;
use crate::wallet::tcc::TryOutcome;

/// The batched calls, one queue per kind.
pub struct WalletBatches {
    tries: GroupCommit<TryRequest, TryOutcome, WalletCallError>,
    confirms: GroupCommit<String, EndOutcome, WalletCallError>,
    cancels: GroupCommit<String, EndOutcome, WalletCallError>,
    debits: GroupCommit<TryRequest, DebitOutcome, WalletCallError>,
}

impl WalletBatches {
    /// Starts the runners on the current runtime.
    pub fn start(wallet: &Arc<WalletClient>, limits: GroupLimits) -> WalletBatches {
        WalletBatches {
            tries: GroupCommit::start(
                limits,
                sent_by(
                    wallet,
                    |w, items| async move { w.tcc_try_batch(&items).await },
                ),
            ),
            confirms: GroupCommit::start(
                limits,
                sent_by(
                    wallet,
                    |w, ids| async move { w.tcc_end_batch(true, &ids).await },
                ),
            ),
            cancels: GroupCommit::start(
                limits,
                sent_by(wallet, |w, ids| async move {
                    w.tcc_end_batch(false, &ids).await
                }),
            ),
            debits: GroupCommit::start(
                limits,
                sent_by(wallet, |w, items| async move {
                    w.message_debit_batch(&items).await
                }),
            ),
        }
    }

    pub async fn tcc_try(&self, request: TryRequest) -> Result<TryOutcome, WalletCallError> {
        self.tries.run(request).await
    }

    pub async fn tcc_confirm(&self, tx_id: &str) -> Result<EndOutcome, WalletCallError> {
        self.confirms.run(tx_id.to_string()).await
    }

    pub async fn tcc_cancel(&self, tx_id: &str) -> Result<EndOutcome, WalletCallError> {
        self.cancels.run(tx_id.to_string()).await
    }

    pub async fn message_debit(
        &self,
        request: TryRequest,
    ) -> Result<DebitOutcome, WalletCallError> {
        self.debits.run(request).await
    }
}

/// A queue's runner: `send` carries the group in one call; a failure of
/// the call is each item's answer.
fn sent_by<I, O, F, Fut>(wallet: &Arc<WalletClient>, send: F) -> RunGroup<I, O, WalletCallError>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Arc<WalletClient>, Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Answers<O>> + Send + 'static,
{
    let wallet = wallet.clone();
    let send = Arc::new(send);
    Arc::new(move |items: Vec<I>| {
        let (wallet, send) = (wallet.clone(), send.clone());
        Box::pin(async move {
            let size = items.len();
            Ok(match send(wallet, items).await {
                Ok(answers) => answers,
                Err(e) => (0..size).map(|_| Err(e.clone())).collect(),
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use seckill_contracts::config::GROUP_COMMIT_MAX_LIMIT;

    #[test]
    fn the_largest_batch_fits_a_request_body() {
        let widest = TryRequest {
            tx_id: "f".repeat(32),
            user_id: u64::MAX,
            order_id: "ffffffff-ffff-ffff-ffff-ffffffffffff".into(),
            amount_cents: i64::MAX,
        };
        let items = vec![widest; GROUP_COMMIT_MAX_LIMIT as usize];
        let body = serde_json::to_vec(&serde_json::json!({ "items": items })).unwrap();
        assert!(
            body.len() < crate::api::MAX_BODY_BYTES,
            "{} bytes",
            body.len()
        );
    }
}

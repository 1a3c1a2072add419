//! Every answer of the seckill route, `POST /api/v1/seckill/{path}/{sale_id}`,
//! outcome by outcome: status, the buyer-facing detail, and whether a
//! `Retry-After` comes with it.
//!
//! The route is answered at the edge by the shipped rule `lua/seckill.lua`,
//! not by the api, so its public description has to come from somewhere
//! both sides can see. This table is that source:
//!
//! ```text
//! ANSWERS ──▶ the api's OpenAPI document (workers::api::openapi), one
//!        │    response per status, each outcome named with its detail
//!        └──▶ gateway rules test: runs lua/seckill.lua for every outcome and
//!             fails when the rule answers anything this table does not say,
//!             or the table lists an outcome the rule no longer produces
//! ```
//!
//! Ops may reword the rule they deploy; the shipped rule and the shipped
//! document never disagree.

/// One outcome of an admission attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionAnswer {
    /// A short name for the outcome (most are `lua/redis/admit.lua`'s).
    pub outcome: &'static str,
    pub status: u16,
    /// The problem `detail` (empty for the 202). `{sale_id}` and
    /// `{retry_after}` stand for the request's sale and the seconds sent
    /// in `Retry-After`.
    pub detail: &'static str,
    /// A `Retry-After` header (seconds) comes with this answer.
    pub retry_after: bool,
    /// When it happens, for the document's readers.
    pub when: &'static str,
}

const fn answer(
    outcome: &'static str,
    status: u16,
    detail: &'static str,
    retry_after: bool,
    when: &'static str,
) -> AdmissionAnswer {
    AdmissionAnswer {
        outcome,
        status,
        detail,
        retry_after,
        when,
    }
}

/// The answers, cheapest check first (the order the rule runs them in).
pub const ANSWERS: &[AdmissionAnswer] = &[
    answer(
        "bad_sale_id",
        404,
        "no such sale",
        false,
        "the sale id is not a positive integer",
    ),
    answer(
        "malformed_path",
        403,
        "the sale path is invalid or has expired",
        false,
        "the path is not 32 lowercase hex digits",
    ),
    answer(
        "unknown_sale",
        404,
        "no such sale",
        false,
        "no sale has this id",
    ),
    answer(
        "not_started",
        409,
        "the sale has not started yet",
        true,
        "before the sale's start; Retry-After is the time left",
    ),
    answer(
        "ended",
        409,
        "the sale has ended",
        false,
        "after the sale's end",
    ),
    answer("sold_out", 410, "sold out", false, "no stock is left"),
    answer(
        "gateway_limited",
        429,
        "too many requests for this sale, please retry",
        true,
        "this gateway's token bucket for the sale is empty",
    ),
    answer(
        "store_unavailable",
        503,
        "the sale is unavailable, please retry",
        true,
        "the admission store (Redis) did not answer",
    ),
    answer(
        "not_ready",
        503,
        "the sale is not ready, please retry shortly",
        true,
        "the sale's stock is not loaded into the admission store yet",
    ),
    answer(
        "bad_path",
        403,
        "the sale path is invalid or has expired",
        false,
        "the path is not the one issued to this buyer for this sale, or it expired",
    ),
    answer(
        "duplicate",
        409,
        "you already bought or are queued for this sale",
        false,
        "the buyer already holds an order or a place in the queue for this sale",
    ),
    answer(
        "limited",
        429,
        "too many attempts, slow down",
        true,
        "the buyer made too many attempts for this sale within the window",
    ),
    answer(
        "queued",
        202,
        "",
        false,
        "a unit is reserved and the order is queued (the broker confirmed it); \
         poll GET /api/v1/sales/{sale_id}/result",
    ),
    answer(
        "released",
        503,
        "the order could not be queued; nothing was reserved, please retry",
        true,
        "the order could not be queued and the reserved unit was given back",
    ),
    answer(
        "not_held",
        503,
        "the order could not be confirmed as queued, and it may have been placed after all: \
         check GET /api/v1/sales/{sale_id}/result before retrying",
        true,
        "the order could not be confirmed and the unit was no longer held: it may have been \
         ordered after all",
    ),
    answer(
        "release_failed",
        503,
        "the order could not be queued and your reservation could not be given back yet; \
         it is released automatically within {retry_after} s, and a retry before then is \
         refused as already queued",
        true,
        "the order could not be queued and giving the unit back failed; it is given back \
         automatically",
    ),
];

/// The answer named `outcome`.
pub fn answer_for(outcome: &str) -> Option<&'static AdmissionAnswer> {
    ANSWERS.iter().find(|a| a.outcome == outcome)
}

/// The outcome of an admitted buyer.
pub const ADMITTED: &str = "queued";

/// The reasons refusals are shown under on the `/ops` dashboard (and its
/// Grafana twin), in display order.
pub const REFUSAL_REASONS: &[&str] = &[
    "sold_out",
    "limited",
    "duplicate",
    "bad_path",
    "not_ready",
    "could_not_enqueue",
    "not_open",
    "other",
];

/// The reason a refusal with `outcome` is shown under; `None` for the
/// admitted outcome. Outcomes the table does not know are `other`.
pub fn refusal_reason(outcome: &str) -> Option<&'static str> {
    Some(match outcome {
        ADMITTED => return None,
        "sold_out" => "sold_out",
        "limited" | "gateway_limited" => "limited",
        "duplicate" => "duplicate",
        "bad_path" | "malformed_path" => "bad_path",
        "not_ready" | "store_unavailable" => "not_ready",
        "released" | "not_held" | "release_failed" => "could_not_enqueue",
        "not_started" | "ended" => "not_open",
        _ => "other",
    })
}

impl AdmissionAnswer {
    /// The detail as sent for `sale_id` with `retry_after` seconds.
    pub fn detail_for(&self, sale_id: u64, retry_after: u64) -> String {
        self.detail
            .replace("{sale_id}", &sale_id.to_string())
            .replace("{retry_after}", &retry_after.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_a_shown_reason_and_only_queued_is_admitted() {
        for a in ANSWERS {
            let reason = refusal_reason(a.outcome);
            assert_eq!(reason.is_none(), a.status == 202, "{}", a.outcome);
            if let Some(r) = reason {
                assert!(REFUSAL_REASONS.contains(&r), "{}", a.outcome);
            }
        }
        assert_eq!(refusal_reason("made_up"), Some("other"));
    }

    #[test]
    fn outcomes_are_unique_and_statuses_are_http() {
        let mut names: Vec<_> = ANSWERS.iter().map(|a| a.outcome).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ANSWERS.len());
        assert!(ANSWERS.iter().all(|a| (200..600).contains(&a.status)));
    }

    #[test]
    fn details_fill_their_placeholders() {
        let a = answer_for("release_failed").unwrap();
        assert!(a.detail_for(7, 70).contains("within 70 s"));
        let a = answer_for("not_held").unwrap();
        assert!(a.detail_for(7, 1).contains("/api/v1/sales/7/result"));
    }
}

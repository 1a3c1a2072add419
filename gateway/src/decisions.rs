//! Admission decisions by outcome: how many buyers this gateway queued,
//! and why it refused the others (sold out, limited, duplicate, ...).
//!
//! ```text
//!  lua/seckill.lua: seckill.decision(outcome, sale_id) ──┐
//!  a replayed shortcut that carries an outcome ──────────┤
//!                                                         ▼
//!                     Decisions::record ──▶ gateway_admission_decisions_total{outcome}
//!                                      └──▶ per-sale tallies ──▶ fleet report (1 s)
//!                                                               ──▶ the api's /ops data
//! ```
//!
//! The outcome names are those of
//! [`seckill_contracts::admission_answers::ANSWERS`], the table the OpenAPI
//! document is written from, so the metric, the dashboard and the document
//! speak of the same outcomes. A name outside the table (an ops rule that
//! invented one) is counted as `other` rather than refused: a typo in a
//! counter must not turn a buyer's answer into a 500, and the label set
//! stays bounded whatever the rules say.

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex};

use prometheus::{register_int_counter_vec, IntCounter, IntCounterVec};
use seckill_contracts::admission_answers::ANSWERS;

/// Label of an outcome the table does not know.
pub const OTHER: &str = "other";

/// Sales whose tallies a gateway keeps: the most recently decided ones.
/// Far more than run at once; bounds memory when ids are probed.
const SALES_KEPT: usize = 256;

static DECISIONS_TOTAL: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "gateway_admission_decisions_total",
        "Seckill admission decisions, by outcome (queued is admitted; the rest are refusals)",
        &["outcome"]
    )
    .expect("metric registers once")
});

/// The outcome names in table order, then [`OTHER`].
fn outcome_names() -> impl Iterator<Item = &'static str> {
    ANSWERS
        .iter()
        .map(|a| a.outcome)
        .chain(std::iter::once(OTHER))
}

/// Index of `outcome` in [`outcome_names`].
fn index_of(outcome: &str) -> usize {
    ANSWERS
        .iter()
        .position(|a| a.outcome == outcome)
        .unwrap_or(ANSWERS.len())
}

struct SaleTally {
    counts: Vec<u64>,
    /// [`Tallies::seq`] at the last decision: a counter, not a clock, so
    /// "least recently decided" is exact.
    touched: u64,
}

#[derive(Default)]
struct Tallies {
    sales: HashMap<u64, SaleTally>,
    seq: u64,
}

/// This gateway's decision counts: a Prometheus counter per outcome (all
/// sales) and a tally per sale for the dashboard.
pub struct Decisions {
    /// Resolved once, so a decision is an atomic add, not a label lookup.
    counters: Vec<IntCounter>,
    tallies: Mutex<Tallies>,
}

impl Default for Decisions {
    fn default() -> Self {
        Decisions {
            counters: outcome_names()
                .map(|name| DECISIONS_TOTAL.with_label_values(&[name]))
                .collect(),
            tallies: Mutex::default(),
        }
    }
}

impl Decisions {
    /// Counts one decision; `sale_id` is `None` when the request named no
    /// valid sale (it counts in the metric only).
    pub fn record(&self, outcome: &str, sale_id: Option<u64>) {
        let i = index_of(outcome);
        self.counters[i].inc();
        let Some(sale_id) = sale_id else {
            return;
        };
        let mut tallies = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        tallies.seq += 1;
        let seq = tallies.seq;
        let sales = &mut tallies.sales;
        if !sales.contains_key(&sale_id) && sales.len() >= SALES_KEPT {
            evict_oldest(sales);
        }
        let tally = sales.entry(sale_id).or_insert_with(|| SaleTally {
            counts: vec![0; ANSWERS.len() + 1],
            touched: seq,
        });
        tally.counts[i] += 1;
        tally.touched = seq;
    }

    /// Every kept sale's non-zero counts by outcome name.
    pub fn by_sale(&self) -> BTreeMap<u64, BTreeMap<String, u64>> {
        let tallies = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        tallies
            .sales
            .iter()
            .map(|(id, tally)| {
                let counts = outcome_names()
                    .zip(&tally.counts)
                    .filter(|(_, n)| **n > 0)
                    .map(|(name, n)| (name.to_string(), *n))
                    .collect();
                (*id, counts)
            })
            .collect()
    }
}

fn evict_oldest(sales: &mut HashMap<u64, SaleTally>) {
    if let Some(oldest) = sales
        .iter()
        .min_by_key(|(_, t)| t.touched)
        .map(|(id, _)| *id)
    {
        sales.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_sale_and_outcome_with_unknown_names_as_other() {
        let d = Decisions::default();
        d.record("queued", Some(7));
        d.record("queued", Some(7));
        d.record("sold_out", Some(7));
        d.record("made_up", Some(8));
        d.record("bad_sale_id", None);
        let by_sale = d.by_sale();
        assert_eq!(by_sale.len(), 2);
        assert_eq!(by_sale[&7]["queued"], 2);
        assert_eq!(by_sale[&7]["sold_out"], 1);
        assert_eq!(by_sale[&7].len(), 2, "zero counts are left out");
        assert_eq!(by_sale[&8][OTHER], 1);
    }

    #[test]
    fn keeps_the_most_recently_decided_sales() {
        let d = Decisions::default();
        for id in 0..(SALES_KEPT as u64 + 10) {
            d.record("queued", Some(id));
        }
        let by_sale = d.by_sale();
        assert_eq!(by_sale.len(), SALES_KEPT);
        assert!(!by_sale.contains_key(&0), "the oldest sale was dropped");
        assert!(by_sale.contains_key(&(SALES_KEPT as u64 + 9)));
    }

    #[test]
    fn every_documented_outcome_has_its_own_label() {
        for a in ANSWERS {
            assert_ne!(index_of(a.outcome), ANSWERS.len(), "{}", a.outcome);
        }
        assert_eq!(outcome_names().count(), ANSWERS.len() + 1);
    }
}

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
//! A shortcut resolves its counters once, when the rule stores it
//! ([`Decisions::resolve`]); each replay is then two atomic adds.
//!
//! The outcome names are those of
//! [`seckill_contracts::admission_answers::ANSWERS`], the table the OpenAPI
//! document is written from, so the metric, the dashboard and the document
//! speak of the same outcomes. A name outside the table (an ops rule that
//! invented one) is counted as `other` rather than refused: a typo in a
//! counter must not turn a buyer's answer into a 500, and the label set
//! stays bounded whatever the rules say.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};

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

/// One sale's counts by outcome: atomics, so counting takes no lock.
struct SaleTally {
    counts: Box<[AtomicU64]>,
    /// [`Decisions::seq`] at the last decision the rules made: a counter,
    /// not a clock, so "least recently decided" is exact.
    touched: AtomicU64,
}

impl SaleTally {
    fn new(seq: u64) -> SaleTally {
        SaleTally {
            counts: (0..=ANSWERS.len()).map(|_| AtomicU64::new(0)).collect(),
            touched: AtomicU64::new(seq),
        }
    }
}

/// A decision resolved once to its counters: what a stored shortcut
/// counts on each replay with two atomic adds (no name lookup, no lock),
/// so the sold-out crowd it answers costs next to nothing to count.
#[derive(Clone)]
pub struct Resolved {
    counter: IntCounter,
    tally: Option<(Arc<SaleTally>, usize)>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved").finish_non_exhaustive()
    }
}

impl Resolved {
    /// Counts one more of this decision.
    pub fn record(&self) {
        self.counter.inc();
        if let Some((tally, i)) = &self.tally {
            tally.counts[*i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// This gateway's decision counts: a Prometheus counter per outcome (all
/// sales) and a tally per sale for the dashboard.
pub struct Decisions {
    /// Resolved once, so a decision is an atomic add, not a label lookup.
    counters: Vec<IntCounter>,
    sales: RwLock<HashMap<u64, Arc<SaleTally>>>,
    seq: AtomicU64,
}

impl Default for Decisions {
    fn default() -> Self {
        Decisions {
            counters: outcome_names()
                .map(|name| DECISIONS_TOTAL.with_label_values(&[name]))
                .collect(),
            sales: RwLock::default(),
            seq: AtomicU64::new(0),
        }
    }
}

impl Decisions {
    /// Counts one decision; `sale_id` is `None` when the request named no
    /// valid sale (it counts in the metric only).
    pub fn record(&self, outcome: &str, sale_id: Option<u64>) {
        self.resolve(outcome, sale_id).record();
    }

    /// The counters of `outcome` for `sale_id`, to count with later (see
    /// [`Resolved`]); marks the sale as recently decided.
    pub fn resolve(&self, outcome: &str, sale_id: Option<u64>) -> Resolved {
        let i = index_of(outcome);
        Resolved {
            counter: self.counters[i].clone(),
            tally: sale_id.map(|id| (self.tally(id), i)),
        }
    }

    fn tally(&self, sale_id: u64) -> Arc<SaleTally> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let found = self
            .sales
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sale_id)
            .cloned();
        if let Some(tally) = found {
            tally.touched.store(seq, Ordering::Relaxed);
            return tally;
        }
        let mut sales = self.sales.write().unwrap_or_else(|e| e.into_inner());
        if !sales.contains_key(&sale_id) && sales.len() >= SALES_KEPT {
            evict_oldest(&mut sales);
        }
        let tally = sales
            .entry(sale_id)
            .or_insert_with(|| Arc::new(SaleTally::new(seq)));
        tally.touched.store(seq, Ordering::Relaxed);
        tally.clone()
    }

    /// Every kept sale's non-zero counts by outcome name.
    pub fn by_sale(&self) -> BTreeMap<u64, BTreeMap<String, u64>> {
        let sales = self.sales.read().unwrap_or_else(|e| e.into_inner());
        sales
            .iter()
            .map(|(id, tally)| {
                let counts = outcome_names()
                    .zip(tally.counts.iter())
                    .map(|(name, n)| (name, n.load(Ordering::Relaxed)))
                    .filter(|(_, n)| *n > 0)
                    .map(|(name, n)| (name.to_string(), n))
                    .collect();
                (*id, counts)
            })
            .collect()
    }
}

/// Drops the least recently decided sale, preferring one no stored
/// shortcut still counts into (its replays would count into nothing).
fn evict_oldest(sales: &mut HashMap<u64, Arc<SaleTally>>) {
    let oldest = |held: bool| {
        sales
            .iter()
            .filter(|(_, t)| held || Arc::strong_count(t) == 1)
            .min_by_key(|(_, t)| t.touched.load(Ordering::Relaxed))
            .map(|(id, _)| *id)
    };
    if let Some(id) = oldest(false).or_else(|| oldest(true)) {
        sales.remove(&id);
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
    fn a_resolved_decision_counts_into_the_same_tally() {
        let d = Decisions::default();
        let replay = d.resolve("sold_out", Some(9));
        replay.record();
        replay.record();
        d.record("sold_out", Some(9));
        assert_eq!(d.by_sale()[&9]["sold_out"], 3);
        for id in 100..(100 + SALES_KEPT as u64) {
            d.record("queued", Some(id));
        }
        replay.record();
        assert_eq!(
            d.by_sale()[&9]["sold_out"],
            4,
            "a sale a stored shortcut counts into is evicted last"
        );
    }

    #[test]
    fn every_documented_outcome_has_its_own_label() {
        for a in ANSWERS {
            assert_ne!(index_of(a.outcome), ANSWERS.len(), "{}", a.outcome);
        }
        assert_eq!(outcome_names().count(), ANSWERS.len() + 1);
    }
}

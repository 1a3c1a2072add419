//! Group commit: the same step of many payments, run together. Under a
//! burst every payment step is a small local transaction, and what the
//! database pays for is the round trip and the durable commit, not the few
//! rows each step moves. So a step is not sent on its own: it joins a
//! queue, and a runner takes everything waiting (up to `max_items`) as one
//! group, which a stored procedure runs as one transaction in one round
//! trip (`*_group` procedures in `migrations/`), then answers each caller.
//!
//! ```text
//!  caller ─▶ queue ─▶ runner (× in_flight) ─▶ run(items sorted) ─▶ one outcome per item
//! ```
//!
//! Nothing waits for a group to fill: a runner takes what is queued the
//! moment it is free, so a lone payment runs alone, as fast as before,
//! and groups grow only while the database is busy. Items are sorted
//! before they run (their `Ord` puts the row each locks first first), so
//! two groups in flight lock in the same order. A group that fails as a
//! whole (any error but an item's own refusal) is run again item by item,
//! so one bad item cannot fail the others and each caller gets its own
//! answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sqlx::MySqlPool;
use tokio::sync::{mpsc, oneshot, Mutex};

/// How big a group may be, and how many run at once (`[payment]`
/// `group_commit_max` and `group_commits_in_flight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// The most items in one group; 1 runs every step alone.
    pub max_items: usize,
    /// Groups in the database at once (each holds one connection).
    pub in_flight: usize,
}

impl GroupLimits {
    pub fn from_config(c: &seckill_contracts::config::PaymentConfig) -> GroupLimits {
        GroupLimits {
            max_items: c.group_commit_max as usize,
            in_flight: c.group_commits_in_flight as usize,
        }
    }
}

/// What runs a group: the items in lock order, one answer per item in
/// the same order, or an error for the group as a whole.
pub type RunGroup<I, O, E> = Arc<
    dyn Fn(Vec<I>) -> Pin<Box<dyn Future<Output = Result<Vec<Result<O, E>>, E>> + Send>>
        + Send
        + Sync,
>;

/// The usual [`RunGroup`]: `step`, an async fn of the pool and the
/// group's items, run on `db`.
pub fn on_pool<I, O, E, F, Fut>(db: &MySqlPool, step: F) -> RunGroup<I, O, E>
where
    F: Fn(MySqlPool, Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Result<O, E>>, E>> + Send + 'static,
{
    let db = db.clone();
    Arc::new(move |items| Box::pin(step(db.clone(), items)))
}

struct Job<I, O, E> {
    item: I,
    answer: oneshot::Sender<Result<O, E>>,
}

type Queue<I, O, E> = Arc<Mutex<mpsc::UnboundedReceiver<Job<I, O, E>>>>;

/// One step's queue and its runners; they stop when this is dropped.
pub struct GroupCommit<I, O, E> {
    queue: mpsc::UnboundedSender<Job<I, O, E>>,
    run: RunGroup<I, O, E>,
}

impl<I, O, E> GroupCommit<I, O, E>
where
    I: Ord + Clone + Send + 'static,
    O: Send + 'static,
    E: std::fmt::Display + From<sqlx::Error> + Send + 'static,
{
    /// Starts `limits.in_flight` runners (on the current tokio runtime).
    pub fn start(limits: GroupLimits, run: RunGroup<I, O, E>) -> GroupCommit<I, O, E> {
        let (queue, jobs) = mpsc::unbounded_channel();
        let jobs: Queue<I, O, E> = Arc::new(Mutex::new(jobs));
        for _ in 0..limits.in_flight.max(1) {
            tokio::spawn(runner(jobs.clone(), run.clone(), limits.max_items.max(1)));
        }
        GroupCommit { queue, run }
    }

    /// Runs `item` in the next group and answers for it alone. Should the
    /// runners be gone (a runtime shutting down), it runs on its own here.
    pub async fn run(&self, item: I) -> Result<O, E> {
        let (answer, answered) = oneshot::channel();
        let job = Job {
            item: item.clone(),
            answer,
        };
        if self.queue.send(job).is_ok() {
            if let Ok(outcome) = answered.await {
                return outcome;
            }
        }
        alone(&self.run, item).await
    }
}

/// Takes whatever is queued as one group, runs it, answers, again.
async fn runner<I, O, E>(jobs: Queue<I, O, E>, run: RunGroup<I, O, E>, max_items: usize)
where
    I: Ord + Clone + Send + 'static,
    O: Send + 'static,
    E: std::fmt::Display + From<sqlx::Error> + Send + 'static,
{
    loop {
        let mut group = {
            let mut jobs = jobs.lock().await;
            let Some(first) = jobs.recv().await else {
                return;
            };
            let mut group = vec![first];
            while group.len() < max_items {
                match jobs.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            group
        };
        group.sort_by(|a, b| a.item.cmp(&b.item));
        answer_group(&run, group).await;
    }
}

async fn answer_group<I, O, E>(run: &RunGroup<I, O, E>, group: Vec<Job<I, O, E>>)
where
    I: Clone,
    E: std::fmt::Display + From<sqlx::Error>,
{
    let items: Vec<I> = group.iter().map(|j| j.item.clone()).collect();
    let size = items.len();
    match run(items).await {
        Ok(outcomes) if outcomes.len() == size => {
            for (job, outcome) in group.into_iter().zip(outcomes) {
                // A caller that gave up waiting needs no answer.
                let _ = job.answer.send(outcome);
            }
        }
        whole => {
            if let Err(e) = &whole {
                tracing::warn!(size, error = %e, "a group failed as a whole; running its items one by one");
            } else {
                tracing::error!(
                    size,
                    "a group answered for another number of items; running them one by one"
                );
            }
            for job in group {
                let outcome = alone(run, job.item).await;
                let _ = job.answer.send(outcome);
            }
        }
    }
}

/// Runs `item` as a group of one, without a queue: a step taken on its
/// own (recovery tools, tests) or one whose group failed as a whole.
pub async fn alone<I, O, E: From<sqlx::Error>>(run: &RunGroup<I, O, E>, item: I) -> Result<O, E> {
    let mut outcomes = run(vec![item]).await?;
    match outcomes.pop() {
        Some(outcome) if outcomes.is_empty() => outcome,
        _ => Err(
            sqlx::Error::Decode("a group of one answered another number of outcomes".into()).into(),
        ),
    }
}

/// Calls a `*_group` procedure with `items` (a JSON array, its first
/// argument) and `extra` arguments after it; its one-row answer is a JSON
/// array of outcomes, one per item. An answer of any other shape is a
/// decode error: the database runs other migrations than this binary. A
/// group InnoDB rolled back as a deadlock victim is called again (it
/// changed nothing, and every item is guarded).
pub async fn call_procedure(
    db: &MySqlPool,
    call: &str,
    items: &[serde_json::Value],
    extra: &[&str],
) -> Result<Vec<Option<String>>, sqlx::Error> {
    crate::orders::retry_on_deadlock(|| call_once(db, call, items, extra)).await
}

async fn call_once(
    db: &MySqlPool,
    call: &str,
    items: &[serde_json::Value],
    extra: &[&str],
) -> Result<Vec<Option<String>>, sqlx::Error> {
    let mut query =
        sqlx::query_scalar::<_, String>(call).bind(serde_json::Value::from(items).to_string());
    for argument in extra {
        query = query.bind(*argument);
    }
    let answer = query.fetch_one(db).await?;
    let outcomes: Vec<Option<String>> =
        serde_json::from_str(&answer).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    if outcomes.len() != items.len() {
        return Err(sqlx::Error::Decode(
            format!(
                "{call} answered {} outcomes for {} items",
                outcomes.len(),
                items.len()
            )
            .into(),
        ));
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, PartialEq)]
    struct Failed(String);

    impl std::fmt::Display for Failed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl From<sqlx::Error> for Failed {
        fn from(e: sqlx::Error) -> Failed {
            Failed(e.to_string())
        }
    }

    /// Doubles each item; 13 fails: alone as itself, in a group the group.
    fn doubling(groups: Arc<Mutex<Vec<Vec<u32>>>>) -> RunGroup<u32, u32, Failed> {
        Arc::new(move |items: Vec<u32>| {
            let groups = groups.clone();
            Box::pin(async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                groups.lock().await.push(items.clone());
                if items.contains(&13) && items.len() > 1 {
                    return Err(Failed("a group with 13 fails whole".into()));
                }
                Ok(items
                    .into_iter()
                    .map(|i| {
                        if i == 13 {
                            Err(Failed("13 alone".into()))
                        } else {
                            Ok(i * 2)
                        }
                    })
                    .collect())
            })
        })
    }

    #[tokio::test]
    async fn a_burst_runs_in_sorted_groups_and_each_caller_gets_its_own_answer() {
        let groups = Arc::new(Mutex::new(Vec::new()));
        let limits = GroupLimits {
            max_items: 8,
            in_flight: 2,
        };
        let g = Arc::new(GroupCommit::start(limits, doubling(groups.clone())));
        let calls: Vec<_> = (0..40u32)
            .filter(|&i| i != 13)
            .rev()
            .map(|i| {
                let g = g.clone();
                tokio::spawn(async move { (i, g.run(i).await) })
            })
            .collect();
        for call in calls {
            let (i, answer) = call.await.unwrap();
            assert_eq!(answer, Ok(i * 2));
        }
        let groups = groups.lock().await;
        assert!(groups.len() < 39, "{} groups for 39 calls", groups.len());
        assert!(groups.iter().all(|g| g.len() <= 8));
        assert!(groups.iter().all(|g| g.windows(2).all(|w| w[0] <= w[1])));
        let mut seen: Vec<u32> = groups.iter().flatten().copied().collect();
        seen.sort();
        let all: Vec<u32> = (0..40).filter(|&i| i != 13).collect();
        assert_eq!(seen, all, "each item ran once");
    }

    #[tokio::test]
    async fn a_group_that_fails_whole_is_answered_item_by_item() {
        let groups = Arc::new(Mutex::new(Vec::new()));
        let limits = GroupLimits {
            max_items: 8,
            in_flight: 1,
        };
        let g = Arc::new(GroupCommit::start(limits, doubling(groups.clone())));
        // Occupy the runner so the next calls queue up into one group.
        let first = tokio::spawn({
            let g = g.clone();
            async move { g.run(1).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let calls: Vec<_> = [12u32, 13, 14]
            .into_iter()
            .map(|i| {
                let g = g.clone();
                tokio::spawn(async move { g.run(i).await })
            })
            .collect();
        assert_eq!(first.await.unwrap(), Ok(2));
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        assert_eq!(
            answers,
            vec![Ok(24), Err(Failed("13 alone".into())), Ok(28)]
        );
        let groups = groups.lock().await;
        assert!(
            groups.contains(&vec![12, 13, 14]),
            "the three queued as one group: {groups:?}"
        );
    }

    #[tokio::test]
    async fn a_lone_call_runs_at_once_alone() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let run: RunGroup<u32, u32, Failed> = Arc::new(move |items: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Ok(items.into_iter().map(Ok).collect()) })
        });
        let limits = GroupLimits {
            max_items: 32,
            in_flight: 4,
        };
        let g = GroupCommit::start(limits, run);
        assert_eq!(g.run(7).await, Ok(7));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

//! `seckillctl audit --sale ID`: checks SPEC invariants 1, 2 and 4 for one
//! sale against the three stores at once, so ops (and the benchmark suite)
//! can prove a sale sold exactly its stock.
//!
//! What is read:
//!
//! * MySQL: `stock_total`, `stock_left`, orders by status, (user, sale)
//!   pairs with more than one order;
//! * Redis: the stock counter, in-flight reservations, buyer markers;
//! * RabbitMQ: messages waiting in the order queue and in its DLQ.
//!
//! The checks:
//!
//! 1. unclosed (unpaid + paying + paid) orders ≤ `stock_total` (no oversell), and
//!    MySQL agrees with itself: `stock_left + unclosed = stock_total`;
//! 2. no (user, sale) with two orders;
//! 4. once quiet (no reservation in flight, nothing queued): Redis stock +
//!    unclosed orders = `stock_total` (no undersell, no stuck units).
//!
//! Invariant 4 only holds when the system is quiet, so [`run`] polls until
//! it is (or `wait` passes): a sale still draining is reported as
//! `quiet: false` and that itself is a violation after the wait, because a
//! reservation older than the wait is a stuck one. A non-empty DLQ is a
//! violation too (an admitted request parked instead of settled, SPEC
//! invariant 3); it is shared by all sales, so the report says so.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use redis::aio::ConnectionLike;
use seckill_contracts::brokers;
use seckill_contracts::config::Config;
use seckill_contracts::keys::{KeySchema, SaleKeys};
use serde::Serialize;
use sqlx::MySqlPool;

use crate::statuses::OrderStatus;

/// Why an audit could not be carried out (as opposed to a violation).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("no sale with id {0}")]
    UnknownSale(u64),
    #[error("MySQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
}

/// Everything the audit saw, and what is wrong with it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditReport {
    pub sale_id: u64,
    pub ok: bool,
    pub quiet: bool,
    pub stock_total: i64,
    pub mysql_stock_left: i64,
    pub orders_unpaid: i64,
    /// Held by a payment in progress (unclosed, like unpaid and paid).
    pub orders_paying: i64,
    pub orders_paid: i64,
    pub orders_closed: i64,
    pub duplicate_pairs: i64,
    pub redis_stock: Option<i64>,
    pub redis_reservations: i64,
    pub redis_buyers: i64,
    pub queue_depth: u32,
    pub dlq_depth: u32,
    pub violations: Vec<String>,
}

/// Audits sale `sale_id`, waiting up to `wait` for it to be quiet.
pub async fn run<C: ConnectionLike>(
    config: &Config,
    db: &MySqlPool,
    redis: &mut C,
    sale_id: u64,
    wait: Duration,
) -> Result<AuditReport, AuditError> {
    let deadline = tokio::time::Instant::now() + wait;
    let (broker, _) = brokers::connect(&config.amqp, ConnectionProperties::default()).await?;
    let result = loop {
        let report = snapshot(config, db, redis, &broker, sale_id).await?;
        if report.quiet || tokio::time::Instant::now() >= deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = broker.close(200, "audit done".into()).await;
    Ok(result)
}

/// What MySQL says about one sale.
struct MysqlFigures {
    stock_total: i64,
    stock_left: i64,
    unpaid: i64,
    paying: i64,
    paid: i64,
    closed: i64,
    duplicate_pairs: i64,
}

/// What Redis says about one sale.
struct RedisFigures {
    stock: Option<i64>,
    reservations: i64,
    buyers: i64,
}

async fn snapshot<C: ConnectionLike>(
    config: &Config,
    db: &MySqlPool,
    redis: &mut C,
    broker: &Connection,
    sale_id: u64,
) -> Result<AuditReport, AuditError> {
    let keys = KeySchema::new(config.redis.key_prefix.clone());
    let m = mysql_figures(db, sale_id).await?;
    let r = redis_figures(redis, &keys.sale(sale_id)).await?;
    let queued = queue_depth(broker, &config.amqp.queue).await?;
    let parked = queue_depth(broker, &config.amqp.dead_letter_queue).await?;
    let quiet = r.reservations == 0 && queued == 0;
    let violations = violations(&m, &r, quiet, queued, parked);
    Ok(AuditReport {
        sale_id,
        ok: violations.is_empty(),
        quiet,
        stock_total: m.stock_total,
        mysql_stock_left: m.stock_left,
        orders_unpaid: m.unpaid,
        orders_paying: m.paying,
        orders_paid: m.paid,
        orders_closed: m.closed,
        duplicate_pairs: m.duplicate_pairs,
        redis_stock: r.stock,
        redis_reservations: r.reservations,
        redis_buyers: r.buyers,
        queue_depth: queued,
        dlq_depth: parked,
        violations,
    })
}

async fn mysql_figures(db: &MySqlPool, sale_id: u64) -> Result<MysqlFigures, AuditError> {
    let (stock_total, stock_left): (i64, i64) = sqlx::query_as(
        "SELECT CAST(stock_total AS SIGNED), CAST(stock_left AS SIGNED) FROM sales WHERE id = ?",
    )
    .bind(sale_id)
    .fetch_optional(db)
    .await?
    .ok_or(AuditError::UnknownSale(sale_id))?;
    let (unpaid, paying, paid, closed): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(status = ?), 0) AS SIGNED), \
                CAST(COALESCE(SUM(status = ?), 0) AS SIGNED), \
                CAST(COALESCE(SUM(status = ?), 0) AS SIGNED), \
                CAST(COALESCE(SUM(status = ?), 0) AS SIGNED) \
         FROM orders WHERE sale_id = ?",
    )
    .bind(OrderStatus::Unpaid)
    .bind(OrderStatus::Paying)
    .bind(OrderStatus::Paid)
    .bind(OrderStatus::Closed)
    .bind(sale_id)
    .fetch_one(db)
    .await?;
    let duplicate_pairs: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT user_id FROM orders WHERE sale_id = ? \
         GROUP BY user_id HAVING COUNT(*) > 1) d",
    )
    .bind(sale_id)
    .fetch_one(db)
    .await?;
    Ok(MysqlFigures {
        stock_total,
        stock_left,
        unpaid,
        paying,
        paid,
        closed,
        duplicate_pairs,
    })
}

async fn redis_figures<C: ConnectionLike>(
    redis: &mut C,
    k: &SaleKeys,
) -> Result<RedisFigures, AuditError> {
    let (stock, reservations, buyers): (Option<i64>, i64, i64) = redis::pipe()
        .cmd("GET")
        .arg(k.stock())
        .cmd("HLEN")
        .arg(k.reservations())
        .cmd("SCARD")
        .arg(k.buyers())
        .query_async(redis)
        .await?;
    Ok(RedisFigures {
        stock,
        reservations,
        buyers,
    })
}

/// The invariants the figures break, each named by its SPEC number.
fn violations(
    m: &MysqlFigures,
    r: &RedisFigures,
    quiet: bool,
    queued: u32,
    parked: u32,
) -> Vec<String> {
    let (stock_total, stock_left) = (m.stock_total, m.stock_left);
    let unclosed = m.unpaid + m.paying + m.paid;
    let mut violations = Vec::new();
    if unclosed > stock_total {
        violations.push(format!(
            "invariant 1: {unclosed} unclosed orders exceed the stock of {stock_total}"
        ));
    }
    if stock_left + unclosed != stock_total {
        violations.push(format!(
            "invariant 1: MySQL stock_left {stock_left} + unclosed {unclosed} != stock_total {stock_total}"
        ));
    }
    if m.duplicate_pairs > 0 {
        violations.push(format!(
            "invariant 2: {} buyers hold more than one order",
            m.duplicate_pairs
        ));
    }
    if !quiet {
        violations.push(format!(
            "invariant 4: not quiet ({} reservations in flight, {queued} messages queued)",
            r.reservations
        ));
    } else {
        match r.stock {
            None => violations.push(
                "invariant 4: the Redis stock counter is missing (run the reconciler)".to_string(),
            ),
            Some(s) if s + unclosed != stock_total => violations.push(format!(
                "invariant 4: Redis stock {s} + unclosed orders {unclosed} != stock_total {stock_total}"
            )),
            Some(_) => {}
        }
    }
    if parked > 0 {
        violations.push(format!(
            "invariant 3: {parked} messages parked in the dead-letter queue (shared by all sales)"
        ));
    }
    violations
}

/// Messages ready in `queue`; a queue never declared holds none.
pub async fn queue_depth(broker: &Connection, queue: &str) -> Result<u32, lapin::Error> {
    Ok(queue_figures(broker, queue).await?.0)
}

/// Messages ready in `queue` and its consumers; a queue not declared yet
/// has neither. A passive declare of a missing queue closes its channel,
/// so each call uses a fresh one.
pub async fn queue_figures(broker: &Connection, queue: &str) -> Result<(u32, u32), lapin::Error> {
    let ch = broker.create_channel().await?;
    let figures = match ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(q) => (q.message_count(), q.consumer_count()),
        // NOT_FOUND is a channel-level (soft) error.
        Err(e) if e.is_amqp_soft_error() => (0, 0),
        Err(e) => return Err(e),
    };
    let _ = ch.close(200, "".into()).await;
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mysql(stock_left: i64, unpaid: i64, paid: i64, closed: i64) -> MysqlFigures {
        MysqlFigures {
            stock_total: 10,
            stock_left,
            unpaid,
            paying: 0,
            paid,
            closed,
            duplicate_pairs: 0,
        }
    }

    fn redis(stock: Option<i64>) -> RedisFigures {
        RedisFigures {
            stock,
            reservations: 0,
            buyers: 0,
        }
    }

    #[test]
    fn a_consistent_quiet_sale_has_no_violation() {
        let v = violations(&mysql(4, 3, 3, 2), &redis(Some(4)), true, 0, 0);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn an_order_being_paid_is_unclosed() {
        let mut m = mysql(4, 2, 3, 2);
        m.paying = 1;
        let v = violations(&m, &redis(Some(4)), true, 0, 0);
        assert!(v.is_empty(), "{v:?}");
        let v = violations(&mysql(4, 2, 3, 2), &redis(Some(4)), true, 0, 0);
        assert!(v.iter().any(|v| v.contains("unclosed 5")), "{v:?}");
    }

    #[test]
    fn each_broken_invariant_is_named() {
        let oversold = violations(&mysql(0, 6, 5, 0), &redis(Some(0)), true, 0, 0);
        assert!(oversold
            .iter()
            .any(|v| v.starts_with("invariant 1: 11 unclosed")));
        let mut dup = mysql(4, 3, 3, 0);
        dup.duplicate_pairs = 1;
        let v = violations(&dup, &redis(Some(4)), true, 0, 0);
        assert!(v.iter().any(|v| v.starts_with("invariant 2")), "{v:?}");
        let v = violations(&mysql(4, 3, 3, 0), &redis(Some(5)), true, 0, 0);
        assert!(
            v.iter()
                .any(|v| v.starts_with("invariant 4: Redis stock 5")),
            "{v:?}"
        );
        let v = violations(&mysql(4, 3, 3, 0), &redis(None), true, 0, 0);
        assert!(v.iter().any(|v| v.contains("counter is missing")), "{v:?}");
        let v = violations(&mysql(4, 3, 3, 0), &redis(Some(4)), false, 2, 1);
        assert!(
            v.iter().any(|v| v.starts_with("invariant 4: not quiet")),
            "{v:?}"
        );
        assert!(
            v.iter().any(|v| v.starts_with("invariant 3: 1 messages")),
            "{v:?}"
        );
    }
}

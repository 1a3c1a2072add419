//! Sales: creating them in MySQL and warming their hot state into Redis.
//!
//! MySQL is written first (goods and sale in one transaction), then Redis is
//! warmed with the `warm_sale` script, which never raises a live sale's
//! stock counter. The same warm-up runs again before a sale starts (and after
//! a Redis restart via the reconciler), so it must be safe to repeat.

use chrono::{DateTime, Utc};
use redis::aio::ConnectionLike;
use seckill_contracts::keys::KeySchema;
use seckill_contracts::sale_events::{self, SaleEvent, SaleEventKind};
use serde::Serialize;
use sqlx::MySqlPool;

/// The Redis-side warm-up script, shared with the gateway's script folder.
pub const WARM_SALE_SCRIPT: &str = include_str!("../../lua/workers/warm_sale.lua");

/// Why a sale could not be created or read.
#[derive(Debug, thiserror::Error)]
pub enum SaleError {
    #[error("invalid sale: {0}")]
    Invalid(&'static str),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What an operator asks for.
#[derive(Debug, Clone)]
pub struct NewSale {
    pub title: String,
    pub price_cents: i64,
    pub sale_price_cents: i64,
    pub stock: u32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

/// A sale as stored in MySQL, joined with its goods.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct Sale {
    pub id: u64,
    pub goods_id: u64,
    pub title: String,
    pub price_cents: i64,
    pub sale_price_cents: i64,
    pub stock_total: u32,
    /// MySQL's own count (the oversell guard), not the Redis counter.
    pub stock_left: u32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

impl NewSale {
    fn validate(&self) -> Result<(), SaleError> {
        if self.title.trim().is_empty() || self.title.chars().count() > 200 {
            return Err(SaleError::Invalid("title must be 1 to 200 characters"));
        }
        if self.price_cents < 0 || self.sale_price_cents < 0 {
            return Err(SaleError::Invalid("prices must not be negative"));
        }
        if self.stock == 0 {
            return Err(SaleError::Invalid("stock must be at least 1"));
        }
        if self.ends_at <= self.starts_at {
            return Err(SaleError::Invalid("ends_at must be after starts_at"));
        }
        Ok(())
    }
}

/// Inserts goods and sale in one transaction, then warms Redis.
pub async fn create<C: ConnectionLike>(
    db: &MySqlPool,
    redis: &mut C,
    keys: &KeySchema,
    new: &NewSale,
) -> Result<Sale, SaleError> {
    new.validate()?;
    let mut tx = db.begin().await?;
    let goods_id = sqlx::query("INSERT INTO goods (title, price_cents) VALUES (?, ?)")
        .bind(&new.title)
        .bind(new.price_cents)
        .execute(&mut *tx)
        .await?
        .last_insert_id();
    let sale_id = sqlx::query(
        "INSERT INTO sales (goods_id, sale_price_cents, stock_total, stock_left, starts_at, ends_at) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(goods_id)
    .bind(new.sale_price_cents)
    .bind(new.stock)
    .bind(new.stock)
    .bind(new.starts_at)
    .bind(new.ends_at)
    .execute(&mut *tx)
    .await?
    .last_insert_id();
    tx.commit().await?;
    let sale = get(db, sale_id)
        .await?
        .ok_or(SaleError::Invalid("sale vanished after insert"))?;
    warm(redis, keys, &sale).await?;
    Ok(sale)
}

/// One sale by id.
pub async fn get(db: &MySqlPool, id: u64) -> Result<Option<Sale>, SaleError> {
    Ok(sqlx::query_as::<_, Sale>(
        "SELECT s.id, s.goods_id, g.title, g.price_cents, s.sale_price_cents, s.stock_total, \
                s.stock_left, s.starts_at, s.ends_at \
         FROM sales s JOIN goods g ON g.id = s.goods_id WHERE s.id = ?",
    )
    .bind(id)
    .fetch_optional(db)
    .await?)
}

/// Writes the sale's info and (if missing or higher) its stock counter into
/// Redis. Returns the stock counter after the call.
pub async fn warm<C: ConnectionLike>(
    redis: &mut C,
    keys: &KeySchema,
    sale: &Sale,
) -> Result<i64, SaleError> {
    let k = keys.sale(sale.id);
    let stock: i64 = redis::Script::new(WARM_SALE_SCRIPT)
        .key(k.info())
        .key(k.stock())
        .arg(sale.stock_left)
        .arg(sale.stock_total)
        .arg(sale.starts_at.timestamp_millis())
        .arg(sale.ends_at.timestamp_millis())
        .arg(sale.goods_id)
        .arg(sale.sale_price_cents)
        .invoke_async(redis)
        .await?;
    // Every gateway drops its copy of the sale (window, sold-out mark).
    sale_events::publish(
        redis,
        keys,
        SaleEvent {
            sale_id: sale.id,
            kind: SaleEventKind::Updated,
        },
    )
    .await?;
    Ok(stock)
}

/// The Redis stock counter of a sale, if warmed.
pub async fn redis_stock<C: ConnectionLike>(
    redis: &mut C,
    keys: &KeySchema,
    sale_id: u64,
) -> Result<Option<i64>, SaleError> {
    Ok(redis::cmd("GET")
        .arg(keys.sale(sale_id).stock())
        .query_async(redis)
        .await?)
}

//! Sales for buyers: list and detail, served cache-aside from Redis.
//!
//! A sale page is the hottest read before a flash sale starts: thousands of
//! buyers refresh it. The static part of a sale (title, prices, window,
//! total) is cached in Redis under `KeySchema.sale(id).cache()` as JSON;
//! `stock_left` is always read live from the stock counter the admission
//! script moves (`KeySchema.sale(id).stock()`), never from the cache, so a
//! cached page cannot show stale stock.
//!
//! * **Stampede**: on a miss only one task per key and process reads MySQL
//!   (single-flight: an in-flight map of key → shared `OnceCell`); the others
//!   wait for its answer. The loader re-reads the cache first, so a task that
//!   missed just before another filled it does not read MySQL again.
//!   Across api instances a short `SET NX PX` lock
//!   (`KeySchema.lock("sale-cache:ID")`, `FillLock`) lets one instance read
//!   MySQL while the others poll the cache for up to [`LOCK_WAIT_MS`]; if
//!   the lock cannot be set at all (Redis failing), the instance reads
//!   MySQL without it.
//! * **Avalanche**: entries live `api.sale_cache_ttl_secs` plus up to 20 %
//!   random jitter (in milliseconds), so keys cached together do not expire
//!   together.
//! * **Penetration**: an id with no sale is cached as JSON `null` for
//!   [`NULL_TTL_SECS`], so a flood of unknown ids reaches MySQL once per id
//!   and TTL, and answers 404.
//! * **Updates**: write MySQL first, then [`invalidate`] (delete the key); the
//!   next read reloads. Deleting rather than writing the new value avoids a
//!   slow writer overwriting a newer value.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use redis::aio::ConnectionLike;
use seckill_contracts::keys::KeySchema;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::{parse_sale_id, Problem, ProblemBody, SaleIdParam};
use super::{metrics, ApiState};
use crate::lock;

/// Lifetime of a "no such sale" marker: short, so a sale created under a
/// previously probed id shows up soon even without an invalidation.
pub const NULL_TTL_SECS: u64 = 10;

/// Lifetime of the cross-instance load lock, and how long another instance
/// waits for the holder's fill before reading MySQL itself.
pub const LOCK_TTL_MS: u64 = 3_000;
/// See [`LOCK_TTL_MS`].
pub const LOCK_WAIT_MS: u64 = 1_000;

/// Most sales the list returns.
pub const LIST_LIMIT: i64 = 100;

/// The cached, slow-changing part of a sale (what MySQL says).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct CachedSale {
    pub id: u64,
    pub goods_id: u64,
    pub title: String,
    pub price_cents: i64,
    pub sale_price_cents: i64,
    pub stock_total: u32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

/// Where a sale stands for a buyer right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SaleStatus {
    Upcoming,
    Active,
    SoldOut,
    Ended,
}

impl SaleStatus {
    /// From the window and the live stock: before start `upcoming`, after end
    /// `ended`, in between `sold_out` at zero stock, else `active`.
    pub fn compute(
        starts_at: DateTime<Utc>,
        ends_at: DateTime<Utc>,
        stock_left: u64,
        now: DateTime<Utc>,
    ) -> SaleStatus {
        if now < starts_at {
            SaleStatus::Upcoming
        } else if now >= ends_at {
            SaleStatus::Ended
        } else if stock_left == 0 {
            SaleStatus::SoldOut
        } else {
            SaleStatus::Active
        }
    }

    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            SaleStatus::Upcoming => "upcoming",
            SaleStatus::Active => "active",
            SaleStatus::SoldOut => "sold_out",
            SaleStatus::Ended => "ended",
        }
    }
}

/// A sale as buyers see it (SPEC §3).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Sale)]
pub struct SaleView {
    #[schema(minimum = 1)]
    pub id: u64,
    pub goods_id: u64,
    pub title: String,
    /// The goods' usual price, in cents.
    pub price_cents: i64,
    /// The price in this sale, in cents.
    pub sale_price_cents: i64,
    pub stock_total: u32,
    /// Units not yet reserved by a buyer.
    pub stock_left: u64,
    #[schema(format = DateTime, example = "2026-12-02T20:00:00Z")]
    pub starts_at: String,
    #[schema(format = DateTime, example = "2026-12-02T20:10:00Z")]
    pub ends_at: String,
    pub status: SaleStatus,
}

/// A sale plus the server's clock, so a buyer's page can count down
/// without trusting the device clock.
#[derive(Debug, Serialize, ToSchema)]
pub struct SaleDetail {
    #[serde(flatten)]
    pub sale: SaleView,
    /// The server's clock when it answered: count down against this.
    #[schema(format = DateTime)]
    pub server_time: String,
}

/// RFC 3339 UTC with a `Z`.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

impl SaleView {
    /// Combines the cached part with the live stock counter (`None` when the
    /// sale was never warmed: reported as 0, so it is never offered).
    pub fn new(sale: &CachedSale, redis_stock: Option<i64>, now: DateTime<Utc>) -> SaleView {
        let stock_left = redis_stock.unwrap_or(0).max(0) as u64;
        SaleView {
            id: sale.id,
            goods_id: sale.goods_id,
            title: sale.title.clone(),
            price_cents: sale.price_cents,
            sale_price_cents: sale.sale_price_cents,
            stock_total: sale.stock_total,
            stock_left,
            starts_at: rfc3339(sale.starts_at),
            ends_at: rfc3339(sale.ends_at),
            status: SaleStatus::compute(sale.starts_at, sale.ends_at, stock_left, now),
        }
    }
}

type Flight = Arc<OnceCell<Result<Option<CachedSale>, String>>>;

/// In-process single-flight of sale loads: at most one MySQL read per sale
/// id at a time, whatever the number of concurrent misses.
#[derive(Default)]
pub struct SingleFlight {
    inflight: Mutex<HashMap<u64, Flight>>,
    /// MySQL reads done by this process's loader (tests and metrics).
    loads: std::sync::atomic::AtomicU64,
}

impl SingleFlight {
    /// MySQL reads performed so far by this instance.
    pub fn db_loads(&self) -> u64 {
        self.loads.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn join(&self, id: u64) -> Flight {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(id).or_default().clone()
    }

    fn finish(&self, id: u64, flight: &Flight) {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&id).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(&id);
        }
    }
}

/// Deletes a sale's cache entry. Call it after the MySQL write of any sale
/// change (DB first, then delete), so readers reload the new row.
pub async fn invalidate<C: ConnectionLike>(
    redis: &mut C,
    keys: &KeySchema,
    sale_id: u64,
) -> redis::RedisResult<()> {
    let _: i64 = redis::cmd("DEL")
        .arg(keys.sale(sale_id).cache())
        .query_async(redis)
        .await?;
    Ok(())
}

/// Reads the cache key: `Some(Some)` a sale, `Some(None)` the null marker,
/// `None` a miss (or an unreadable entry, treated as a miss).
async fn read_cache(state: &ApiState, id: u64) -> Result<Option<Option<CachedSale>>, Problem> {
    let mut redis = state.redis();
    let raw: Option<String> = redis::cmd("GET")
        .arg(state.keys().sale(id).cache())
        .query_async(&mut redis)
        .await
        .map_err(Problem::internal)?;
    Ok(raw.and_then(|s| serde_json::from_str::<Option<CachedSale>>(&s).ok()))
}

/// One MySQL read of a sale (goods joined).
pub async fn load_from_db(
    db: &sqlx::MySqlPool,
    id: u64,
) -> Result<Option<CachedSale>, sqlx::Error> {
    sqlx::query_as::<_, CachedSale>(
        "SELECT s.id, s.goods_id, g.title, g.price_cents, s.sale_price_cents, s.stock_total, \
                s.starts_at, s.ends_at \
         FROM sales s JOIN goods g ON g.id = s.goods_id WHERE s.id = ?",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}

/// TTL in milliseconds: `base_secs` plus up to 20 % random jitter.
pub fn jittered_ttl_ms(base_secs: u64) -> u64 {
    let base = base_secs.max(1) * 1000;
    base + rand::rng().random_range(0..=base / 5)
}

/// The loader run once per key by the single flight.
async fn load_and_fill(state: &ApiState, id: u64) -> Result<Option<CachedSale>, String> {
    // Double-check: another task may have filled it since our miss.
    if let Ok(Some(hit)) = read_cache(state, id).await {
        return Ok(hit);
    }
    let lock = FillLock::take(state, id).await;
    if lock == FillLock::Busy {
        if let Some(hit) = wait_for_fill(state, id).await {
            return Ok(hit);
        }
    }
    let result = read_db_and_fill(state, id).await;
    lock.release(state).await;
    result
}

/// The cross-instance lock on loading one sale from MySQL
/// (`KeySchema.lock("sale-cache:ID")`, `SET NX PX` with [`LOCK_TTL_MS`]):
/// one api instance reads MySQL while the others wait briefly for its fill.
#[derive(Debug, PartialEq, Eq)]
enum FillLock {
    /// This call set the lock to `token` and deletes it when done.
    Held { key: String, token: String },
    /// Another instance holds it: wait for its fill (bounded), then read
    /// MySQL anyway if the holder is slow or died.
    Busy,
    /// The `SET NX` itself failed (Redis down, refused): read MySQL without
    /// the lock. Availability over dedupe, on purpose: Redis trouble must
    /// not turn sale pages into errors or waits, and the in-process single
    /// flight still keeps it to one MySQL read per instance. Nothing was
    /// set, so nothing is released.
    Unavailable,
}

impl FillLock {
    async fn take(state: &ApiState, id: u64) -> FillLock {
        let key = state.keys().lock(&format!("sale-cache:{id}"));
        // A lock owner token from the lock module, never a buyer-facing
        // value: nothing outside this lock can ever hold the same one.
        let token = lock::new_owner();
        let ttl = Duration::from_millis(LOCK_TTL_MS);
        match lock::acquire_raw(&mut state.redis(), &key, &token, ttl).await {
            Ok(true) => FillLock::Held { key, token },
            Ok(false) => FillLock::Busy,
            Err(e) => {
                tracing::warn!(sale_id = id, error = %e, "sale cache lock unavailable; reading MySQL without it");
                FillLock::Unavailable
            }
        }
    }

    /// Deletes the lock if this call holds it and it is still ours
    /// (compare-and-delete: a holder past its TTL must not delete the lock
    /// another instance took meanwhile).
    async fn release(self, state: &ApiState) {
        let FillLock::Held { key, token } = self else {
            return;
        };
        if let Err(e) = lock::release_raw(&mut state.redis(), &key, &token).await {
            tracing::debug!(key, error = %e, "releasing the sale cache lock failed; it expires");
        }
    }
}

/// Polls the cache for another instance's fill for up to [`LOCK_WAIT_MS`].
async fn wait_for_fill(state: &ApiState, id: u64) -> Option<Option<CachedSale>> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(LOCK_WAIT_MS);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(Some(hit)) = read_cache(state, id).await {
            return Some(hit);
        }
    }
    None
}

/// The MySQL read and cache fill, under the locks.
async fn read_db_and_fill(state: &ApiState, id: u64) -> Result<Option<CachedSale>, String> {
    state
        .flights()
        .loads
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    metrics::sale_db_load();
    let sale = load_from_db(state.db(), id)
        .await
        .map_err(|e| format!("loading sale {id}: {e}"))?;
    let (value, ttl_ms) = match &sale {
        Some(s) => (
            serde_json::to_string(s).map_err(|e| e.to_string())?,
            jittered_ttl_ms(state.config().sale_cache_ttl_secs),
        ),
        None => ("null".to_string(), jittered_ttl_ms(NULL_TTL_SECS)),
    };
    let mut redis = state.redis();
    // A failed fill only costs a later reload; the answer is still good.
    let filled: redis::RedisResult<()> = redis::cmd("SET")
        .arg(state.keys().sale(id).cache())
        .arg(value)
        .arg("PX")
        .arg(ttl_ms)
        .query_async(&mut redis)
        .await;
    if let Err(e) = filled {
        tracing::warn!(sale_id = id, error = %e, "could not fill the sale cache");
    }
    Ok(sale)
}

/// The static part of sale `id` through the cache; `None` when there is no
/// such sale.
pub async fn cached_sale(state: &ApiState, id: u64) -> Result<Option<CachedSale>, Problem> {
    if let Some(hit) = read_cache(state, id).await? {
        metrics::sale_cache(if hit.is_some() { "hit" } else { "null_hit" });
        return Ok(hit);
    }
    metrics::sale_cache("miss");
    let flight = state.flights().join(id);
    let result = flight
        .get_or_init(|| load_and_fill(state, id))
        .await
        .clone();
    state.flights().finish(id, &flight);
    result.map_err(Problem::internal)
}

/// The live stock counter of one sale.
pub async fn live_stock(state: &ApiState, id: u64) -> Result<Option<i64>, Problem> {
    let mut redis = state.redis();
    redis::cmd("GET")
        .arg(state.keys().sale(id).stock())
        .query_async(&mut redis)
        .await
        .map_err(Problem::internal)
}

/// Sale `id` as buyers see it now; `None` when there is no such sale.
pub async fn sale_view(state: &ApiState, id: u64) -> Result<Option<SaleView>, Problem> {
    let Some(sale) = cached_sale(state, id).await? else {
        return Ok(None);
    };
    let stock = live_stock(state, id).await?;
    Ok(Some(SaleView::new(&sale, stock, Utc::now())))
}

/// `/api/v1/sales` and `/api/v1/sales/{id}`.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(detail))
}

/// One sale, with the server's clock.
#[utoipa::path(
    get,
    path = "/api/v1/sales/{id}",
    tag = "sales",
    operation_id = "get_sale",
    params(SaleIdParam),
    responses(
        (status = 200, description = "The sale", body = SaleDetail),
        (status = 404, description = "No such sale", body = ProblemBody),
    ),
)]
async fn detail(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<Json<SaleDetail>, Problem> {
    let id = parse_sale_id(&raw)?;
    let sale = sale_view(&state, id)
        .await?
        .ok_or_else(|| Problem::not_found("no such sale"))?;
    Ok(Json(SaleDetail {
        sale,
        server_time: rfc3339(Utc::now()),
    }))
}

/// The sales: upcoming, active and recently ended
///
/// One MySQL query, with live stock from one MGET.
#[utoipa::path(
    get,
    path = "/api/v1/sales",
    tag = "sales",
    operation_id = "list_sales",
    responses((status = 200, description = "Upcoming, active and recently ended sales, soonest first", body = Vec<SaleView>)),
)]
async fn list(State(state): State<ApiState>) -> Result<Json<Vec<SaleView>>, Problem> {
    let cutoff = Utc::now() - chrono::Duration::days(1);
    let sales: Vec<CachedSale> = sqlx::query_as(
        "SELECT s.id, s.goods_id, g.title, g.price_cents, s.sale_price_cents, s.stock_total, \
                s.starts_at, s.ends_at \
         FROM sales s JOIN goods g ON g.id = s.goods_id \
         WHERE s.ends_at > ? ORDER BY s.starts_at, s.id LIMIT ?",
    )
    .bind(cutoff)
    .bind(LIST_LIMIT)
    .fetch_all(state.db())
    .await
    .map_err(Problem::internal)?;
    if sales.is_empty() {
        return Ok(Json(Vec::new()));
    }
    let keys: Vec<String> = sales
        .iter()
        .map(|s| state.keys().sale(s.id).stock())
        .collect();
    let mut redis = state.redis();
    let stocks: Vec<Option<i64>> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut redis)
        .await
        .map_err(Problem::internal)?;
    let now = Utc::now();
    Ok(Json(
        sales
            .iter()
            .zip(stocks.into_iter().chain(std::iter::repeat(None)))
            .map(|(s, stock)| SaleView::new(s, stock, now))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_from_window_and_stock() {
        let now = Utc::now();
        let h = chrono::Duration::hours(1);
        assert_eq!(
            SaleStatus::compute(now + h, now + h + h, 5, now),
            SaleStatus::Upcoming
        );
        assert_eq!(
            SaleStatus::compute(now - h, now + h, 5, now),
            SaleStatus::Active
        );
        assert_eq!(
            SaleStatus::compute(now - h, now + h, 0, now),
            SaleStatus::SoldOut
        );
        assert_eq!(
            SaleStatus::compute(now - h - h, now - h, 5, now),
            SaleStatus::Ended
        );
        assert_eq!(
            SaleStatus::compute(now - h - h, now - h, 0, now),
            SaleStatus::Ended
        );
    }

    #[test]
    fn ttl_jitter_stays_within_twenty_percent() {
        for _ in 0..1000 {
            let t = jittered_ttl_ms(60);
            assert!((60_000..=72_000).contains(&t), "{t}");
        }
    }

    #[test]
    fn null_marker_round_trips() {
        assert_eq!(
            serde_json::from_str::<Option<CachedSale>>("null").unwrap(),
            None
        );
    }
}

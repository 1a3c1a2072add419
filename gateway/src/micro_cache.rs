//! The edge's micro-cache of public pages: the sales list and a sale's page,
//! which every buyer refreshes while waiting for a sale to open.
//!
//! ```text
//! lookup(key)   fresh page (younger than the route's cache_ms)  → Hit
//!               stale page, nobody refreshing it                → Fill: this
//!                             request goes upstream, and its answer refreshes
//!               stale page, a refresh under way                 → Hit (stale)
//!               no page, nobody fetching it                     → Fill
//!               no page, a fetch under way                      → Wait for it
//!               cache full                                      → Bypass
//! Fill::response / body    the upstream answer, copied as it streams to
//!                          its own client; stored when whole and storable
//! ```
//!
//! One request per page and gateway goes upstream at a time, however many
//! buyers refresh at once; a page is kept `cache_ms` fresh, then up to
//! `micro_cache.stale_ms` more while one request refreshes it
//! (stale-while-revalidate), so the api sees about one request per page,
//! gateway and second. Only a whole `200` is stored, and only when its
//! headers allow it for everyone (no `Set-Cookie`, `Vary`,
//! `Content-Encoding`, `Cache-Control: private / no-store / no-cache`); the
//! routes that may be cached are public `GET`s (checked with the config),
//! so a page is the same for every caller. A sale page's `server_time` is
//! rewritten on every answer: a cached page still tells the buyer's
//! countdown the time of now, not of the fetch. `X-Cache` says which it was
//! (`HIT`, `STALE`, `MISS`, `BYPASS`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use seckill_contracts::config::MicroCacheConfig;
use tokio::sync::watch;

/// The JSON member rewritten on every answer, and how it is written.
const CLOCK_FIELD: &[u8] = b"\"server_time\":\"";

/// Headers of the upstream answer that belong to its own connection or
/// request, not to the page.
const NOT_STORED: [HeaderName; 5] = [
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::DATE,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("x-request-id"),
];

/// How often a full cache looks for expired pages to drop: a flood of new
/// keys then costs one sweep a second, not one per request.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A stored page.
#[derive(Debug)]
pub struct Page {
    stored_at: Instant,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Plain(Bytes),
    /// Split around the value of `server_time`, which each answer fills.
    AroundClock {
        before: Bytes,
        after: Bytes,
    },
}

/// What a request does with the cache.
pub enum Lookup {
    /// Answer with this page; `stale` while another request refreshes it.
    Hit { page: Arc<Page>, stale: bool },
    /// Go upstream; the answer is offered to the cache through this.
    Fill(Fill),
    /// Another request is fetching this page: wait for it.
    Wait(watch::Receiver<()>),
    /// Go upstream without storing (the cache is full).
    Bypass,
}

#[derive(Default)]
struct Slot {
    page: Option<Arc<Page>>,
    /// Present while one request fetches the page; its sender is dropped
    /// when that fetch ends either way, which wakes the waiters.
    fetching: Option<watch::Receiver<()>>,
}

#[derive(Default)]
struct Slots {
    by_key: HashMap<Box<str>, Slot>,
    swept_at: Option<Instant>,
}

/// The cache of one gateway.
pub struct MicroCache {
    config: MicroCacheConfig,
    slots: Mutex<Slots>,
}

impl MicroCache {
    pub fn new(config: MicroCacheConfig) -> Arc<MicroCache> {
        Arc::new(MicroCache {
            config,
            slots: Mutex::default(),
        })
    }

    /// How long a request waits for another's fetch.
    pub fn wait_limit(&self) -> Duration {
        Duration::from_millis(self.config.wait_ms)
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What to do for `key` (path and query) on a route fresh for `fresh`.
    pub fn lookup(self: &Arc<Self>, key: &str, fresh: Duration) -> Lookup {
        let stale_until = fresh + Duration::from_millis(self.config.stale_ms);
        let now = Instant::now();
        let mut guard = self.slots();
        let slots = &mut *guard;
        // Probed with the request's own key: a hit allocates nothing.
        if !slots.by_key.contains_key(key) {
            if !self.make_room(slots, now, stale_until) {
                return Lookup::Bypass;
            }
            slots.by_key.insert(key.into(), Slot::default());
        }
        let Some(slot) = slots.by_key.get_mut(key) else {
            return Lookup::Bypass;
        };
        if let Some(page) = &slot.page {
            let age = now - page.stored_at;
            if age < fresh || (age < stale_until && slot.fetching.is_some()) {
                return Lookup::Hit {
                    page: page.clone(),
                    stale: age >= fresh,
                };
            }
        }
        match &slot.fetching {
            Some(fetch) => Lookup::Wait(fetch.clone()),
            None => {
                let (done, rx) = watch::channel(());
                slot.fetching = Some(rx);
                Lookup::Fill(Fill {
                    cache: self.clone(),
                    key: key.into(),
                    done: Some(done),
                    headers: None,
                    body: BytesMut::new(),
                })
            }
        }
    }

    /// Whether a new key fits, after dropping pages past their stale window
    /// (at most once per [`SWEEP_EVERY`]).
    fn make_room(&self, slots: &mut Slots, now: Instant, stale_until: Duration) -> bool {
        if slots.by_key.len() < self.config.max_entries {
            return true;
        }
        if slots.swept_at.is_some_and(|t| now - t < SWEEP_EVERY) {
            return false;
        }
        slots.swept_at = Some(now);
        slots.by_key.retain(|_, slot| {
            slot.fetching.is_some()
                || slot
                    .page
                    .as_ref()
                    .is_some_and(|p| now - p.stored_at < stale_until)
        });
        slots.by_key.len() < self.config.max_entries
    }

    /// Ends the fetch of `key`, storing `page` when there is one.
    fn finish(&self, key: &str, page: Option<Page>) {
        let mut slots = self.slots();
        let Some(slot) = slots.by_key.get_mut(key) else {
            return;
        };
        slot.fetching = None;
        if let Some(page) = page {
            slot.page = Some(Arc::new(page));
        } else if slot.page.is_none() {
            slots.by_key.remove(key);
        }
    }

    /// Whether no page or fetch is held.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.slots().by_key.is_empty()
    }
}

/// One request's fetch of a page: it sees the upstream answer go by and
/// stores it when it may. Dropped without storing (an error, a refusal, a
/// cut connection), it only ends the fetch, and a waiter takes over.
pub struct Fill {
    cache: Arc<MicroCache>,
    key: Box<str>,
    done: Option<watch::Sender<()>>,
    /// The page's headers once the answer proved storable; `None` also
    /// means "pass the rest through".
    headers: Option<Vec<(HeaderName, HeaderValue)>>,
    body: BytesMut,
}

impl Fill {
    /// The upstream answer's header: storable or not.
    pub fn response(&mut self, response: &ResponseHeader) {
        if response.status.as_u16() != 200 || !storable(&response.headers) {
            return;
        }
        let headers = response
            .headers
            .iter()
            .filter(|(name, _)| !NOT_STORED.contains(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        self.headers = Some(headers);
    }

    /// A piece of the upstream body; the last one stores the page.
    pub fn body(&mut self, chunk: Option<&Bytes>, end_of_stream: bool) {
        if self.headers.is_none() {
            return;
        }
        if let Some(chunk) = chunk {
            if self.body.len() + chunk.len() > self.cache.config.max_body_bytes {
                self.headers = None;
                self.body = BytesMut::new();
                return;
            }
            self.body.extend_from_slice(chunk);
        }
        if end_of_stream {
            let page = Page {
                stored_at: Instant::now(),
                headers: self.headers.take().unwrap_or_default(),
                body: Body::split(std::mem::take(&mut self.body).freeze()),
            };
            self.cache.finish(&self.key, Some(page));
            self.done = None;
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if self.done.take().is_some() {
            self.cache.finish(&self.key, None);
        }
    }
}

/// Whether an answer with these headers is the same for everyone.
fn storable(headers: &http::HeaderMap) -> bool {
    if headers.contains_key(header::SET_COOKIE)
        || headers.contains_key(header::VARY)
        || headers.contains_key(header::CONTENT_ENCODING)
    {
        return false;
    }
    !headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .any(|d| d == "private" || d == "no-store" || d == "no-cache")
}

impl Body {
    fn split(body: Bytes) -> Body {
        let Some(start) = find(&body, CLOCK_FIELD).map(|i| i + CLOCK_FIELD.len()) else {
            return Body::Plain(body);
        };
        match body[start..].iter().position(|b| *b == b'"') {
            Some(len) => Body::AroundClock {
                before: body.slice(..start),
                after: body.slice(start + len..),
            },
            None => Body::Plain(body),
        }
    }

    fn render(&self) -> Bytes {
        match self {
            Body::Plain(b) => b.clone(),
            Body::AroundClock { before, after } => {
                let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                let mut out = BytesMut::with_capacity(before.len() + now.len() + after.len());
                out.extend_from_slice(before);
                out.extend_from_slice(now.as_bytes());
                out.extend_from_slice(after);
                out.freeze()
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Page {
    /// Writes the page as this request's answer.
    pub async fn write(
        &self,
        session: &mut Session,
        request_id: &str,
        stale: bool,
    ) -> pingora::Result<()> {
        let mut header = crate::problem::answer_header(200, self.headers.len() + 4)?;
        for (name, value) in &self.headers {
            header.append_header(name.clone(), value.clone())?;
        }
        header.insert_header(header::AGE, self.stored_at.elapsed().as_secs())?;
        header.insert_header("x-cache", if stale { "STALE" } else { "HIT" })?;
        crate::problem::write_whole(session, header, self.body.render(), request_id).await
    }

    /// The body this page answers with now.
    #[cfg(test)]
    fn rendered(&self) -> Bytes {
        self.body.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_entries: usize) -> Arc<MicroCache> {
        MicroCache::new(MicroCacheConfig {
            stale_ms: 100,
            max_entries,
            max_body_bytes: 64,
            wait_ms: 50,
        })
    }

    fn answer(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        r.append_header("content-type", "application/json").unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn fill(lookup: Lookup) -> Fill {
        match lookup {
            Lookup::Fill(f) => f,
            _ => panic!("expected a fill"),
        }
    }

    fn store(cache: &Arc<MicroCache>, key: &str, body: &str) {
        let mut f = fill(cache.lookup(key, Duration::from_millis(50)));
        f.response(&answer(200, &[]));
        f.body(Some(&Bytes::copy_from_slice(body.as_bytes())), true);
    }

    #[test]
    fn one_fetch_per_key_then_hits_then_stale_while_refreshing() {
        let c = cache(10);
        let fresh = Duration::from_millis(50);
        let mut first = fill(c.lookup("/a", fresh));
        assert!(matches!(c.lookup("/a", fresh), Lookup::Wait(_)));
        assert!(matches!(c.lookup("/b", fresh), Lookup::Fill(_)));
        first.response(&answer(200, &[("x-request-id", "r1")]));
        first.body(Some(&Bytes::from_static(b"[1,")), false);
        first.body(Some(&Bytes::from_static(b"2]")), true);
        let Lookup::Hit { page, stale } = c.lookup("/a", fresh) else {
            panic!("expected a hit")
        };
        assert!(!stale);
        assert_eq!(page.rendered(), Bytes::from_static(b"[1,2]"));
        assert!(
            page.headers.iter().all(|(n, _)| n != "x-request-id"),
            "the fetch's own request id is not part of the page"
        );
        std::thread::sleep(Duration::from_millis(60));
        let refresh = fill(c.lookup("/a", fresh));
        assert!(matches!(
            c.lookup("/a", fresh),
            Lookup::Hit { stale: true, .. }
        ));
        drop(refresh);
        assert!(
            matches!(c.lookup("/a", fresh), Lookup::Fill(_)),
            "a failed refresh leaves the next request to try"
        );
    }

    #[test]
    fn a_page_past_its_stale_window_is_a_miss() {
        let c = cache(10);
        store(&c, "/a", "x");
        std::thread::sleep(Duration::from_millis(160));
        let _refresh = fill(c.lookup("/a", Duration::from_millis(50)));
        assert!(
            matches!(c.lookup("/a", Duration::from_millis(50)), Lookup::Wait(_)),
            "too old to serve even while refreshing"
        );
    }

    #[test]
    fn waiters_wake_when_the_fetch_ends_either_way() {
        let c = cache(10);
        let f = fill(c.lookup("/a", Duration::from_secs(1)));
        let Lookup::Wait(mut rx) = c.lookup("/a", Duration::from_secs(1)) else {
            panic!("expected to wait")
        };
        drop(f);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let woke = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
            assert!(woke.is_ok(), "a dropped fetch wakes its waiters");
        });
        assert!(c.is_empty(), "a failed first fetch leaves nothing behind");
    }

    #[test]
    fn only_whole_public_200s_are_stored() {
        let c = cache(10);
        let refused: [(u16, &[(&str, &str)]); 6] = [
            (404, &[]),
            (200, &[("set-cookie", "a=b")]),
            (200, &[("vary", "accept-encoding")]),
            (200, &[("content-encoding", "gzip")]),
            (200, &[("cache-control", "max-age=5, private")]),
            (200, &[("cache-control", "no-store")]),
        ];
        for (status, headers) in refused {
            let mut f = fill(c.lookup("/a", Duration::from_secs(1)));
            f.response(&answer(status, headers));
            f.body(Some(&Bytes::from_static(b"{}")), true);
            drop(f);
            assert!(
                matches!(c.lookup("/a", Duration::from_secs(1)), Lookup::Fill(_)),
                "{status} {headers:?} must not be stored"
            );
        }
        let mut f = fill(c.lookup("/big", Duration::from_secs(1)));
        f.response(&answer(200, &[]));
        f.body(Some(&Bytes::from(vec![b'x'; 40])), false);
        f.body(Some(&Bytes::from(vec![b'x'; 40])), true);
        drop(f);
        assert!(
            matches!(c.lookup("/big", Duration::from_secs(1)), Lookup::Fill(_)),
            "over max_body_bytes is passed through"
        );
    }

    #[test]
    fn server_time_is_rewritten_on_every_answer() {
        let c = cache(10);
        store(&c, "/s", r#"{"id":1,"server_time":"2000-01-01T00:00:00Z"}"#);
        let Lookup::Hit { page, .. } = c.lookup("/s", Duration::from_secs(1)) else {
            panic!("expected a hit")
        };
        let body: serde_json::Value = serde_json::from_slice(&page.rendered()).unwrap();
        let shown =
            chrono::DateTime::parse_from_rfc3339(body["server_time"].as_str().unwrap()).unwrap();
        let skew = chrono::Utc::now().signed_duration_since(shown);
        assert!(skew.num_seconds().abs() < 2, "server_time is now: {skew}");
        assert_eq!(body["id"], 1);
    }

    #[test]
    fn a_full_cache_bypasses_new_keys_until_pages_expire() {
        let c = cache(2);
        store(&c, "/a", "1");
        store(&c, "/b", "2");
        assert!(matches!(
            c.lookup("/c", Duration::from_millis(50)),
            Lookup::Bypass
        ));
        assert!(matches!(
            c.lookup("/a", Duration::from_millis(50)),
            Lookup::Hit { .. }
        ));
        std::thread::sleep(SWEEP_EVERY + Duration::from_millis(10));
        assert!(
            matches!(c.lookup("/c", Duration::from_millis(50)), Lookup::Fill(_)),
            "expired pages make room"
        );
    }
}

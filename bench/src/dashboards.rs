//! Open `/ops` dashboards during a scenario (`--dashboards N`): each polls
//! the sale's figures through the gateway once a second, as the page does,
//! so the report shows what the dashboard's endpoint costs under load and
//! the scenario's own figures show what the dashboards cost the sale.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the dashboards saw.
#[derive(Debug, Default, Clone)]
pub struct DashboardStats {
    pub dashboards: usize,
    pub polls: usize,
    pub errors: usize,
    /// Milliseconds per answered poll, sorted.
    latencies_ms: Vec<f64>,
}

impl DashboardStats {
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.latencies_ms.is_empty() {
            return None;
        }
        let i = ((self.latencies_ms.len() - 1) as f64 * q).round() as usize;
        self.latencies_ms.get(i).copied()
    }

    /// One line for the report.
    pub fn note(&self) -> String {
        let ms = |q| {
            self.quantile(q)
                .map_or("–".to_string(), |v| format!("{v:.2} ms"))
        };
        format!(
            "{} dashboards polling /ops/api/sales/{{id}} every 1 s: {} polls, {} errors, \
             p50 {}, p99 {}, max {}",
            self.dashboards,
            self.polls,
            self.errors,
            ms(0.5),
            ms(0.99),
            ms(1.0)
        )
    }
}

/// Starts `n` pollers of `url` until `stop` turns true; their stats come
/// back from the handle.
pub fn spawn(
    http: reqwest::Client,
    url: String,
    token: String,
    n: usize,
    stop: watch::Receiver<bool>,
) -> JoinHandle<DashboardStats> {
    tokio::spawn(async move {
        let pollers: Vec<_> = (0..n)
            .map(|i| {
                let (http, url, token, mut stop) =
                    (http.clone(), url.clone(), token.clone(), stop.clone());
                // Spread over the second, as independent pages would be.
                let offset = Duration::from_millis((1000 * i / n.max(1)) as u64);
                tokio::spawn(async move {
                    let mut seen = (0usize, Vec::new());
                    tokio::time::sleep(offset).await;
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tokio::select! {
                            _ = tick.tick() => {}
                            _ = stop.changed() => return seen,
                        }
                        let started = Instant::now();
                        let ok = match http.get(&url).bearer_auth(&token).send().await {
                            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                            _ => false,
                        };
                        if ok {
                            seen.1.push(started.elapsed().as_secs_f64() * 1e3);
                        } else {
                            seen.0 += 1;
                        }
                    }
                })
            })
            .collect();
        let mut stats = DashboardStats {
            dashboards: n,
            ..DashboardStats::default()
        };
        for p in pollers {
            if let Ok((errors, latencies)) = p.await {
                stats.errors += errors;
                stats.polls += errors + latencies.len();
                stats.latencies_ms.extend(latencies);
            }
        }
        stats.latencies_ms.sort_by(f64::total_cmp);
        stats
    })
}

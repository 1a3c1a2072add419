//! Scrapes the gateway's `/metrics` once a second during a scenario, so the
//! report can plot throughput over time and count responses by status
//! exactly (wrk only knows "non-2xx").

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

/// Responses counted by the gateway, by status code.
pub type StatusCounts = BTreeMap<u16, u64>;

/// One second of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_secs: f64,
    pub rps: f64,
}

/// Reads `gateway_requests_total` for `route` (all routes when `None`).
pub async fn scrape(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    route: Option<&str>,
) -> anyhow::Result<StatusCounts> {
    let text = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(parse(&text, route))
}

/// Sums `gateway_requests_total{route=..,status=..}` by status.
pub fn parse(text: &str, route: Option<&str>) -> StatusCounts {
    let mut out = StatusCounts::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("gateway_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_string())
            })
        };
        if let Some(want) = route {
            if label("route").as_deref() != Some(want) {
                continue;
            }
        }
        let (Some(status), Ok(v)) = (label("status"), value.trim().parse::<f64>()) else {
            continue;
        };
        if let Ok(code) = status.parse::<u16>() {
            *out.entry(code).or_default() += v as u64;
        }
    }
    out
}

/// `after - before`, per status.
pub fn delta(before: &StatusCounts, after: &StatusCounts) -> StatusCounts {
    after
        .iter()
        .map(|(k, v)| (*k, v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Samples the total request rate every second until `stop` flips.
pub async fn sample_until(
    url: String,
    token: String,
    route: Option<String>,
    mut stop: watch::Receiver<bool>,
) -> Vec<Sample> {
    let http = reqwest::Client::new();
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut last: Option<(Instant, u64)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let Ok(counts) = scrape(&http, &url, &token, route.as_deref()).await else {
            continue;
        };
        let total: u64 = counts.values().sum();
        let now = Instant::now();
        if let Some((t0, c0)) = last {
            let dt = now.duration_since(t0).as_secs_f64();
            if dt > 0.0 {
                samples.push(Sample {
                    t_secs: now.duration_since(start).as_secs_f64(),
                    rps: total.saturating_sub(c0) as f64 / dt,
                });
            }
        }
        last = Some((now, total));
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_by_status_for_a_route() {
        let text = "# HELP x\ngateway_requests_total{route=\"seckill\",status=\"202\"} 100\n\
                    gateway_requests_total{route=\"seckill\",status=\"410\"} 7\n\
                    gateway_requests_total{route=\"health\",status=\"200\"} 5\n";
        let all = parse(text, None);
        assert_eq!(all[&202], 100);
        assert_eq!(all[&200], 5);
        let s = parse(text, Some("seckill"));
        assert_eq!(s.get(&200), None);
        let before = StatusCounts::from([(202, 40)]);
        assert_eq!(
            delta(&before, &s),
            StatusCounts::from([(202, 60), (410, 7)])
        );
    }
}

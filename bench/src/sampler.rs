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
    /// The route's `gateway_request_duration_seconds` buckets at this
    /// second (cumulative since the gateway started): the difference of
    /// two samples is that interval's latency, as the gateway measured it.
    #[serde(skip)]
    pub latency: Buckets,
}

/// Cumulative histogram buckets: (upper bound in seconds, observations at
/// or below it), in Prometheus order (ascending, `+Inf` last).
pub type Buckets = Vec<(f64, u64)>;

/// The gateway's `/metrics` text.
pub async fn metrics_text(
    http: &reqwest::Client,
    url: &str,
    token: &str,
) -> anyhow::Result<String> {
    Ok(http
        .get(url)
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// Reads `gateway_requests_total` for `route` (all routes when `None`).
pub async fn scrape(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    route: Option<&str>,
) -> anyhow::Result<StatusCounts> {
    Ok(parse(&metrics_text(http, url, token).await?, route))
}

/// The buckets of `gateway_publish_confirm_seconds{outcome="confirmed"}`:
/// how long admitted requests waited for RabbitMQ's publisher confirm.
pub fn confirm_buckets(text: &str) -> Buckets {
    buckets(
        text,
        "gateway_publish_confirm_seconds",
        "outcome=\"confirmed\"",
    )
}

/// The buckets of `gateway_request_duration_seconds{route=...}`: the time
/// from request header to response end, measured in the gateway.
pub fn latency_buckets(text: &str, route: &str) -> Buckets {
    buckets(
        text,
        "gateway_request_duration_seconds",
        &format!("route=\"{route}\""),
    )
}

/// The buckets of histogram `name` whose labels include `label`.
fn buckets(text: &str, name: &str, label: &str) -> Buckets {
    let prefix = format!("{name}_bucket{{");
    text.lines()
        .filter_map(|line| line.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (labels, value) = rest.split_once("} ")?;
            if !labels.split(',').any(|l| l == label) {
                return None;
            }
            let le = labels.split(',').find_map(|kv| kv.strip_prefix("le="))?;
            let le = le.trim_matches('"');
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// The upper bound of the bucket holding quantile `q` of the observations
/// made between `before` and `after`, and how many there were; `None`
/// when there were none. A histogram only bounds a quantile from above.
pub fn bucket_quantile(before: &Buckets, after: &Buckets, q: f64) -> Option<(f64, u64)> {
    let count_before = |bound: f64| {
        before
            .iter()
            .find(|(b, _)| *b == bound)
            .map_or(0, |(_, n)| *n)
    };
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|(b, n)| (*b, n.saturating_sub(count_before(*b))))
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil() as u64;
    delta
        .iter()
        .find(|(_, n)| *n >= rank)
        .map(|(b, _)| (*b, total))
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

/// The status counts of several gateways together.
pub fn sum_counts(counts: &[StatusCounts]) -> StatusCounts {
    let mut out = StatusCounts::new();
    for c in counts {
        for (code, n) in c {
            *out.entry(*code).or_default() += n;
        }
    }
    out
}

/// Histograms of several gateways added bucket by bucket (same bounds
/// add up; a bound only one has is kept), in ascending order.
pub fn sum_buckets(all: &[&Buckets]) -> Buckets {
    let mut out: Buckets = Vec::new();
    for buckets in all {
        for (bound, n) in buckets.iter() {
            match out.iter_mut().find(|(b, _)| b == bound) {
                Some((_, total)) => *total += n,
                None => out.push((*bound, *n)),
            }
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The per-second samples of several gateways scraped side by side, as
/// one series: the n-th samples add up (rates and histograms), timed as
/// the first gateway's; a gateway with fewer samples adds nothing to the
/// seconds it lacks.
pub fn merge_samples(series: &[Vec<Sample>]) -> Vec<Sample> {
    let len = series.iter().map(Vec::len).max().unwrap_or(0);
    (0..len)
        .map(|i| {
            let nth: Vec<&Sample> = series.iter().filter_map(|s| s.get(i)).collect();
            Sample {
                t_secs: nth.first().map_or(0.0, |s| s.t_secs),
                rps: nth.iter().map(|s| s.rps).sum(),
                latency: sum_buckets(&nth.iter().map(|s| &s.latency).collect::<Vec<_>>()),
            }
        })
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
        let Ok(text) = metrics_text(&http, &url, &token).await else {
            continue;
        };
        let counts = parse(&text, route.as_deref());
        let latency = route
            .as_deref()
            .map(|r| latency_buckets(&text, r))
            .unwrap_or_default();
        let total: u64 = counts.values().sum();
        let now = Instant::now();
        if let Some((t0, c0)) = last {
            let dt = now.duration_since(t0).as_secs_f64();
            if dt > 0.0 {
                samples.push(Sample {
                    t_secs: now.duration_since(start).as_secs_f64(),
                    rps: total.saturating_sub(c0) as f64 / dt,
                    latency,
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

    #[test]
    fn two_gateways_add_up() {
        let a = StatusCounts::from([(202, 10), (410, 5)]);
        let b = StatusCounts::from([(410, 7), (503, 1)]);
        assert_eq!(
            sum_counts(&[a, b]),
            StatusCounts::from([(202, 10), (410, 12), (503, 1)])
        );
        let x: Buckets = vec![(0.001, 5), (0.01, 9), (f64::INFINITY, 10)];
        let y: Buckets = vec![(0.001, 1), (f64::INFINITY, 4)];
        assert_eq!(
            sum_buckets(&[&x, &y]),
            vec![(0.001, 6), (0.01, 9), (f64::INFINITY, 14)]
        );
        let sample = |t: f64, rps: f64, latency: &Buckets| Sample {
            t_secs: t,
            rps,
            latency: latency.clone(),
        };
        let merged = merge_samples(&[
            vec![sample(1.0, 100.0, &x), sample(2.0, 50.0, &x)],
            vec![sample(1.1, 30.0, &y)],
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!((merged[0].t_secs, merged[0].rps), (1.0, 130.0));
        assert_eq!(merged[0].latency, sum_buckets(&[&x, &y]));
        assert_eq!((merged[1].t_secs, merged[1].rps), (2.0, 50.0));
        assert!(merge_samples(&[]).is_empty());
    }

    #[test]
    fn confirm_quantiles_come_from_the_bucket_deltas() {
        let text = |fast: u64, slow: u64| {
            format!(
                "gateway_publish_confirm_seconds_bucket{{outcome=\"confirmed\",le=\"0.01\"}} {fast}\n\
                 gateway_publish_confirm_seconds_bucket{{outcome=\"confirmed\",le=\"0.1\"}} {}\n\
                 gateway_publish_confirm_seconds_bucket{{outcome=\"confirmed\",le=\"+Inf\"}} {}\n\
                 gateway_publish_confirm_seconds_bucket{{outcome=\"timeout\",le=\"0.01\"}} 9\n",
                fast + slow,
                fast + slow
            )
        };
        let before = confirm_buckets(&text(5, 0));
        assert_eq!(before.len(), 3, "only the confirmed outcome");
        // 90 fast and 10 slow confirms during the run.
        let after = confirm_buckets(&text(95, 10));
        assert_eq!(bucket_quantile(&before, &after, 0.5), Some((0.01, 100)));
        assert_eq!(bucket_quantile(&before, &after, 0.9), Some((0.01, 100)));
        assert_eq!(bucket_quantile(&before, &after, 0.99), Some((0.1, 100)));
        assert_eq!(bucket_quantile(&after, &after, 0.5), None);
    }
}

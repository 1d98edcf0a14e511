//! `sluice-bench`: control-plane benchmarks with real processes (release build).
//!
//! * `apply`: `PUT /v1/config` of 10,000 hosts, 1,000 certificates and 2,000 backends: time to
//!   validate and commit, and until every worker applied it.
//! * `push`: time from a committed write to every connected worker's Ack, p50/p99 over 100
//!   writes, with 1 and 4 workers and 10 or 10,000 hosts loaded; bytes on the wire per push.
//!
//! Both clocks are the API's: the version's `created_at` and each worker's Ack time as the API
//! recorded it in the rollout. Results are printed as JSON lines and written by `bench/run`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::{self_signed, wait_for, Api, Worker, WORKER_TOKEN};

fn parse_time(s: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 time")
}

/// A document with `hosts` hosts over `certs` certificates and `backends` backends.
fn document(hosts: usize, certs: usize, backends: usize) -> Value {
    let certificates: Vec<Value> = (0..certs)
        .map(|i| {
            let (cert, key) = self_signed(&[&format!("*.s{i}.example")]);
            json!({"name": format!("c{i}"), "cert_pem": cert, "key_pem": key})
        })
        .collect();
    let backends_doc: Vec<Value> = (0..backends)
        .map(|i| json!({"name": format!("b{i}"), "protocol": "http",
            "servers": [{"address": format!("127.{}.{}.1:9", i / 250 + 1, i % 250)}, {"address": format!("127.{}.{}.2:9", i / 250 + 1, i % 250)}],
            // Loopback addresses nothing listens on; checks rarely, so they do not load the machine.
            "health_check": {"interval_ms": 3_600_000, "timeout_ms": 1000}}))
        .collect();
    let hosts_doc: Vec<Value> = (0..hosts)
        .map(|i| {
            json!({"hostname": format!("h{i}.s{}.example", i % certs), "mode": "terminate",
            "backend": format!("b{}", i % backends), "certificate": format!("c{}", i % certs)})
        })
        .collect();
    json!({"certificates": certificates, "backends": backends_doc, "hosts": hosts_doc})
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn start(workers: usize, dir: &std::path::Path) -> (Api, Vec<Worker>) {
    let api = Api::start(&dir.join("api"), "127.0.0.1:0", &["--workers", "0"]);
    let ws = (0..workers)
        .map(|i| {
            Worker::start(
                &api.url(),
                &dir.join(format!("w{i}")),
                &format!("edge-{i}"),
                WORKER_TOKEN,
            )
        })
        .collect();
    api.wait_applied(workers, 1).await;
    (api, ws)
}

async fn bench_apply() -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let (api, _workers) = start(1, dir.path()).await;
    let doc = document(10_000, 1_000, 2_000);
    let body_bytes = doc.to_string().len();
    let t = Instant::now();
    let (status, applied) = api.http.send("PUT", "/v1/config", Some(doc)).await;
    let commit = t.elapsed();
    anyhow::ensure!(status == 200, "apply failed: {applied}");
    let v = applied["version"].as_u64().unwrap_or(0);
    api.wait_applied(1, v).await;
    let applied_all = t.elapsed();
    Ok(
        json!({"bench": "apply", "hosts": 10_000, "certificates": 1_000, "backends": 2_000,
        "document_bytes": body_bytes, "commit_ms": commit.as_secs_f64() * 1000.0,
        "worker_applied_ms": applied_all.as_secs_f64() * 1000.0}),
    )
}

async fn bench_push(workers: usize, hosts: usize, writes: usize) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let (api, ws) = start(workers, dir.path()).await;
    let certs = if hosts >= 1000 { 1000 } else { 1 };
    let (status, applied) = api
        .http
        .send("PUT", "/v1/config", Some(document(hosts, certs, 10)))
        .await;
    anyhow::ensure!(status == 200, "load failed: {applied}");
    api.wait_applied(workers, applied["version"].as_u64().unwrap_or(0))
        .await;
    let backends = api.http.get("/v1/backends").await.1;
    let backend = backends
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["name"] == "b0")
        .and_then(|b| b["id"].as_str())
        .unwrap_or_default()
        .to_owned();
    let mut latencies = Vec::with_capacity(writes + 1);
    // One more write than measured: the first, right after the bulk load, is a warm-up (caches
    // cold, the load's snapshot still being saved); it is reported apart as `first_ms`.
    for i in 0..=writes {
        let body = json!({"name": "b0", "protocol": "http",
            "servers": [{"address": "127.1.0.1:9", "weight": 1 + i % 200}, {"address": "127.1.0.2:9"}],
            "health_check": {"interval_ms": 3_600_000, "timeout_ms": 1000}});
        let (status, reply) = api
            .http
            .send("PUT", &format!("/v1/backends/{backend}"), Some(body))
            .await;
        anyhow::ensure!(status == 200, "write failed: {reply}");
        let v = api.version().await;
        let rollout = wait_for(Duration::from_secs(30), || async {
            let r = api
                .http
                .get(&format!("/v1/config/versions/{v}/rollout"))
                .await
                .1;
            let all = r["workers"].as_array().is_some_and(|ws| {
                ws.len() == workers && ws.iter().all(|w| w["status"] == "applied")
            });
            all.then_some(r)
        })
        .await
        .ok_or_else(|| anyhow::anyhow!("version {v} was not applied by every worker"))?;
        let created = api.http.get(&format!("/v1/config/versions/{v}")).await.1["created_at"]
            .as_str()
            .map(parse_time);
        let last_ack = rollout["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w["at"].as_str().map(parse_time))
            .max();
        if let (Some(c), Some(a)) = (created, last_ack) {
            latencies.push((a - c).as_seconds_f64() * 1000.0);
        }
    }
    if std::env::var_os("SLUICE_BENCH_LOGS").is_some() {
        eprintln!("latencies in write order (ms): {latencies:.0?}");
    }
    let first = if latencies.is_empty() {
        0.0
    } else {
        latencies.remove(0)
    };
    latencies.sort_by(|a, b| a.total_cmp(b));
    // SLUICE_BENCH_LOGS=1: each worker's own account of every apply (build and total time).
    if std::env::var_os("SLUICE_BENCH_LOGS").is_some() {
        for line in api.proc.log_text().lines().filter(|l| {
            l.contains("snapshot encoded") || l.contains("method=PUT path=/v1/backends")
        }) {
            eprintln!("{line}");
        }
        for w in &ws {
            for line in w
                .proc
                .log_text()
                .lines()
                .filter(|l| l.contains("applied snapshot") || l.contains("snapshot received"))
            {
                eprintln!("{line}");
            }
        }
    }
    let metrics = api.http.get("/metrics").await.1;
    let bytes = metrics
        .as_str()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("sluice_api_snapshot_bytes "))
        })
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(
        json!({"bench": "push", "workers": workers, "hosts": hosts, "writes": latencies.len(), "first_ms": first,
        "p50_ms": percentile(&latencies, 0.5), "p99_ms": percentile(&latencies, 0.99),
        "max_ms": latencies.last().copied().unwrap_or(0.0), "bytes_per_push": bytes}),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let quick = std::env::args().any(|a| a == "--quick");
    let writes = if quick { 30 } else { 100 };
    if what == "apply" || what == "all" {
        println!("{}", bench_apply().await?);
    }
    if what == "push" || what == "all" {
        for (workers, hosts) in [(1, 10), (4, 10), (1, 10_000), (4, 10_000)] {
            println!("{}", bench_push(workers, hosts, writes).await?);
        }
    }
    Ok(())
}

//! The API's own Prometheus metrics and the per-request log line.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::AppState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

/// Counters and histograms of the API process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    config_version: Gauge,
    snapshot_bytes: Gauge,
    workers_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice_api");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        });
        let config_version = Gauge::default();
        let snapshot_bytes = Gauge::default();
        let workers_connected = Gauge::default();
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time to answer a request",
            duration.clone(),
        );
        registry.register(
            "config_version",
            "Newest committed configuration version",
            config_version.clone(),
        );
        registry.register(
            "snapshot_bytes",
            "Size on the wire of the newest snapshot pushed to workers (compressed)",
            snapshot_bytes.clone(),
        );
        registry.register(
            "workers_connected",
            "Workers with an open channel",
            workers_connected.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            config_version,
            snapshot_bytes,
            workers_connected,
        }
    }
}

impl Metrics {
    /// The text exposition of every metric.
    pub fn render(&self, version: u64, snapshot_bytes: u64, workers_connected: usize) -> String {
        self.config_version.set(version as i64);
        self.snapshot_bytes.set(snapshot_bytes as i64);
        self.workers_connected.set(workers_connected as i64);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Middleware: count and time every request and log one line for it (never its body).
pub async fn observe(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let resp = next.run(req).await;
    let elapsed = start.elapsed();
    let status = resp.status().as_u16();
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method.to_string(),
            route: route.clone(),
            status,
        })
        .inc();
    app.metrics
        .duration
        .get_or_create(&RouteLabels { route })
        .observe(elapsed.as_secs_f64());
    tracing::info!(target: "sluice_api::access", %method, %path, status, duration_ms = elapsed.as_secs_f64() * 1000.0, "request");
    resp
}

//! The worker's admin listener (loopback by default): `/healthz`, `/readyz` (503 until the first
//! snapshot is applied), `/status` (applied version and hash) and `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use uuid::Uuid;

use crate::runtime::Source;
use crate::Worker;

/// What `/status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub worker_id: Uuid,
    pub pid: u32,
    pub name: String,
    pub api: String,
    pub api_connected: bool,
    /// The HTTPS listener's address.
    pub https_address: Option<String>,
    pub applied_version: Option<u64>,
    pub applied_hash: Option<String>,
    pub applied_at: Option<String>,
    pub source: Option<Source>,
    pub hosts: usize,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(w): State<Arc<Worker>>) -> Response {
    match w.current.load() {
        Some(rt) => (StatusCode::OK, format!("ready: version {}\n", rt.version)).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no snapshot applied yet\n").into_response(),
    }
}

async fn status(State(w): State<Arc<Worker>>) -> Json<Status> {
    let rt = w.current.load();
    Json(Status {
        worker_id: w.id,
        pid: std::process::id(),
        name: w.name.clone(),
        api: w.api.clone(),
        api_connected: w.connected.load(Ordering::Relaxed),
        https_address: w.https_bound.get().map(|a| a.to_string()),
        applied_version: rt.as_ref().map(|r| r.version.get()),
        applied_hash: rt.as_ref().map(|r| r.hash.clone()),
        applied_at: rt.as_ref().map(|r| r.applied_at.clone()),
        source: rt.as_ref().map(|r| r.source),
        hosts: rt.as_ref().map_or(0, |r| r.config.hosts.len()),
    })
}

async fn metrics(State(w): State<Arc<Worker>>) -> Response {
    let body = w.metrics.render(w.connected.load(Ordering::Relaxed));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn health(
    State(w): State<Arc<Worker>>,
) -> Json<foldhash::HashMap<Uuid, crate::health::ServerHealth>> {
    Json(w.health.snapshot())
}

/// The admin router.
pub fn router(worker: Arc<Worker>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(worker)
}

//! `/v1/backends/{id}/health` and `/v1/health`: each server's state as every connected worker
//! sees it, and an overall verdict: `up` when every reporting worker says up, `down` when all
//! say down, `partial` otherwise, `unknown` without reports.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use sluice_shared::channel::ServerReport;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, Problem};
use crate::extract::parse_id;
use crate::AppState;

/// One worker's verdict on one server.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerVerdict {
    pub worker_id: Uuid,
    pub worker_name: String,
    #[serde(flatten)]
    pub report: ServerReport,
}

/// One server: the overall status and every worker's own verdict.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServerHealthView {
    pub server_id: Uuid,
    pub address: String,
    /// `up`, `down`, `partial` or `unknown`.
    pub status: String,
    pub workers: Vec<WorkerVerdict>,
}

/// The health of a backend's servers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackendHealth {
    pub backend_id: Uuid,
    pub name: String,
    pub servers: Vec<ServerHealthView>,
}

/// Server counts of one backend, for dashboards and probes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackendSummary {
    pub backend_id: Uuid,
    pub name: String,
    pub up: usize,
    pub down: usize,
    pub partial: usize,
    pub unknown: usize,
}

/// The overall verdict from the workers' verdicts (pure).
pub fn overall<'a>(statuses: impl IntoIterator<Item = &'a str>) -> &'static str {
    let all: Vec<&str> = statuses.into_iter().filter(|s| *s != "unknown").collect();
    if all.is_empty() {
        "unknown"
    } else if all.iter().all(|s| *s == "up") {
        "up"
    } else if all.iter().all(|s| *s == "down") {
        "down"
    } else {
        "partial"
    }
}

async fn backend_health(app: &AppState, id: Uuid) -> Result<BackendHealth, ApiError> {
    let backend = super::found(app.db.get_backend(id).await?, "backend", id)?.item;
    let names: HashMap<Uuid, String> = app
        .db
        .list_workers()
        .await?
        .into_iter()
        .map(|w| (w.id, w.name))
        .collect();
    let reports = app.workers.health_of(id);
    let servers = backend
        .servers
        .iter()
        .map(|s| {
            let workers: Vec<WorkerVerdict> = reports
                .iter()
                .filter(|(_, r)| r.server_id == s.id)
                .map(|(w, r)| WorkerVerdict {
                    worker_id: *w,
                    worker_name: names.get(w).cloned().unwrap_or_default(),
                    report: r.clone(),
                })
                .collect();
            ServerHealthView {
                server_id: s.id,
                address: s.address.to_string(),
                status: overall(workers.iter().map(|v| v.report.status.as_str())).to_owned(),
                workers,
            }
        })
        .collect();
    Ok(BackendHealth {
        backend_id: backend.id,
        name: backend.name,
        servers,
    })
}

/// Each server of a backend: overall status and every connected worker's verdict.
#[utoipa::path(get, path = "/v1/backends/{id}/health", tag = "backends", operation_id = "get_backend_health",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = BackendHealth),
              (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn backend(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BackendHealth>, ApiError> {
    Ok(Json(backend_health(&app, parse_id(&id)?).await?))
}

/// Every backend with its count of servers up, down, partial and unknown.
#[utoipa::path(get, path = "/v1/health", tag = "backends", operation_id = "get_health",
    responses((status = 200, body = Vec<BackendSummary>),
              (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn all(State(app): State<AppState>) -> Result<Json<Vec<BackendSummary>>, ApiError> {
    let mut out = Vec::new();
    for b in app.db.list_backends().await? {
        let h = backend_health(&app, b.item.id).await?;
        let count = |st: &str| h.servers.iter().filter(|s| s.status == st).count();
        out.push(BackendSummary {
            backend_id: h.backend_id,
            name: h.name.clone(),
            up: count("up"),
            down: count("down"),
            partial: count("partial"),
            unknown: count("unknown"),
        });
    }
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::overall;

    #[test]
    fn overall_verdicts() {
        assert_eq!(overall([]), "unknown");
        assert_eq!(overall(["unknown"]), "unknown");
        assert_eq!(overall(["up", "up"]), "up");
        assert_eq!(overall(["down", "down", "unknown"]), "down");
        assert_eq!(overall(["up", "down"]), "partial");
    }
}

//! `/v1/workers`: the registry of managed and remote workers, and replacing a managed one.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::found;
use crate::db::WorkerRow;
use crate::error::{ApiError, Problem};
use crate::extract::parse_id;
use crate::workers::supervisor::ReplaceError;
use crate::AppState;

/// A worker as the API sees it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerOut {
    pub id: Uuid,
    pub name: String,
    /// Spawned and supervised by this API (`--workers`), or a remote `sluice-worker`.
    pub managed: bool,
    pub connected: bool,
    /// The worker's HTTPS listener.
    pub address: Option<String>,
    /// The worker's admin listener (`/status`, `/metrics`).
    pub admin_address: Option<String>,
    pub first_seen: String,
    pub last_seen: String,
    pub applied_version: Option<u64>,
    pub applied_hash: Option<String>,
    pub applied_at: Option<String>,
    /// Why the worker last refused a version.
    pub last_error: Option<String>,
    pub last_error_version: Option<u64>,
    pub last_error_at: Option<String>,
}

impl WorkerOut {
    pub fn new(w: WorkerRow, connected: bool) -> WorkerOut {
        WorkerOut {
            id: w.id,
            name: w.name,
            managed: w.managed,
            connected,
            address: w.address,
            admin_address: w.admin_address,
            first_seen: w.first_seen,
            last_seen: w.last_seen,
            applied_version: w.applied_version,
            applied_hash: w.applied_hash,
            applied_at: w.applied_at,
            last_error: w.last_error,
            last_error_version: w.last_error_version,
            last_error_at: w.last_error_at,
        }
    }
}

/// The result of a managed worker's replacement.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Replaced {
    pub replaced: Uuid,
    pub worker: WorkerOut,
}

async fn load(app: &AppState, id: Uuid) -> Result<WorkerRow, ApiError> {
    found(app.db.get_worker(id).await?, "worker", id)
}

/// List workers.
#[utoipa::path(get, path = "/v1/workers", tag = "workers", operation_id = "list_workers",
    responses((status = 200, body = Vec<WorkerOut>),
              (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(State(app): State<AppState>) -> Result<Json<Vec<WorkerOut>>, ApiError> {
    let rows = app.db.list_workers().await?;
    Ok(Json(
        rows.into_iter()
            .map(|w| {
                let c = app.workers.is_connected(w.id);
                WorkerOut::new(w, c)
            })
            .collect(),
    ))
}

/// Show one worker.
#[utoipa::path(get, path = "/v1/workers/{id}", tag = "workers", operation_id = "get_worker",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = WorkerOut),
              (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WorkerOut>, ApiError> {
    let id = parse_id(&id)?;
    let w = load(&app, id).await?;
    Ok(Json(WorkerOut::new(w, app.workers.is_connected(id))))
}

/// Forget a disconnected worker.
#[utoipa::path(delete, path = "/v1/workers/{id}", tag = "workers", operation_id = "delete_worker",
    params(("id" = Uuid, Path)),
    responses((status = 204),
              (status = 404, body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "still connected", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn delete(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    load(&app, id).await?;
    if app.workers.is_connected(id) {
        return Err(ApiError::Conflict {
            detail: format!(
                "worker {id} is connected; only a disconnected worker can be forgotten"
            ),
            errors: vec![],
        });
    }
    app.db.delete_worker(id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Replace a managed worker: start a new one, wait for its Ack of the current version, then
/// drain and stop the old one. Connections are never refused on the way (the listeners share
/// their ports with SO_REUSEPORT).
#[utoipa::path(post, path = "/v1/workers/{id}/restart", tag = "workers", operation_id = "restart_worker",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Replaced),
              (status = 404, body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "not a managed worker of this API", body = Problem, content_type = "application/problem+json"),
              (status = 504, description = "the replacement did not become ready", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn restart(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Replaced>, ApiError> {
    let id = parse_id(&id)?;
    load(&app, id).await?;
    let supervisor = app.supervisor.get().ok_or_else(|| ApiError::Conflict {
        detail: "this API runs no managed workers (--workers 0)".into(),
        errors: vec![],
    })?;
    let new_id = supervisor
        .replace(id, &app.workers)
        .await
        .map_err(|e| match e {
            ReplaceError::NotManaged(_) => ApiError::Conflict {
                detail: format!("{e}; remote workers are restarted by whatever runs them"),
                errors: vec![],
            },
            ReplaceError::Timeout(_) => ApiError::Timeout {
                detail: e.to_string(),
            },
            other => ApiError::Internal(anyhow::Error::new(other)),
        })?;
    let w = load(&app, new_id).await?;
    Ok(Json(Replaced {
        replaced: id,
        worker: WorkerOut::new(w, app.workers.is_connected(new_id)),
    }))
}

//! `/v1/backends`: server pools, how to speak to them and how to check them.

use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use sluice_shared::validate::ObjectKind;
use sluice_shared::{Backend, BackendTls, Balance, HealthCheck, Protocol};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    commit, etag_of, found, just_written, refuse_if_referenced, with_etag, DryRun, ObjectOut,
    Written,
};
use crate::convert::{servers, ServerSpec};
use crate::db::{now_text, Stored};
use crate::error::{ApiError, Problem};
use crate::extract::{parse_id, ApiJson, IfMatch, WriteParams};
use crate::AppState;

fn default_weight() -> u16 {
    1
}

fn default_true() -> bool {
    true
}

/// A server as sent by clients.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerInput {
    /// Keep a server's id across updates (its health state follows the id). When omitted, a
    /// server with the same address keeps its id, otherwise a new one is made.
    #[serde(default)]
    pub id: Option<Uuid>,
    /// `host:port`.
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u16,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

/// A backend as sent by clients; omitted settings take their defaults.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendInput {
    pub name: String,
    pub protocol: Protocol,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub servers: Vec<ServerInput>,
    #[serde(default)]
    pub health_check: HealthCheck,
    #[serde(default)]
    pub tls: Option<BackendTls>,
}

/// A stored backend.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackendOut {
    #[serde(flatten)]
    pub backend: Backend,
    pub created_at: String,
    pub updated_at: String,
}

impl ObjectOut for BackendOut {
    const KIND: ObjectKind = ObjectKind::Backend;
}

impl From<Stored<Backend>> for BackendOut {
    fn from(s: Stored<Backend>) -> Self {
        BackendOut {
            backend: s.item,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

impl BackendInput {
    /// Build the model, keeping ids of `old` servers; every bad address is reported.
    fn into_backend(self, id: Uuid, old: Option<&Backend>) -> Result<Backend, ApiError> {
        let mut errors = Vec::new();
        let specs = self
            .servers
            .into_iter()
            .map(|s| ServerSpec {
                id: s.id,
                address: s.address,
                weight: s.weight,
                enabled: s.enabled,
            })
            .collect();
        let servers = servers(specs, old, "", &mut errors);
        if !errors.is_empty() {
            return Err(ApiError::invalid(errors));
        }
        Ok(Backend {
            id,
            name: self.name,
            protocol: self.protocol,
            balance: self.balance,
            servers,
            health_check: self.health_check,
            tls: self.tls,
        })
    }
}

/// List backends.
#[utoipa::path(get, path = "/v1/backends", tag = "backends", operation_id = "list_backends",
    responses((status = 200, body = Vec<BackendOut>),
              (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(State(app): State<AppState>) -> Result<Json<Vec<BackendOut>>, ApiError> {
    Ok(Json(
        app.db
            .list_backends()
            .await?
            .into_iter()
            .map(BackendOut::from)
            .collect(),
    ))
}

/// Show one backend.
#[utoipa::path(get, path = "/v1/backends/{id}", tag = "backends", operation_id = "get_backend",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = BackendOut, headers(("ETag" = String))),
              (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let stored = found(app.db.get_backend(id).await?, "backend", id)?;
    Ok(with_etag(BackendOut::from(stored)))
}

/// Create a backend.
#[utoipa::path(post, path = "/v1/backends", tag = "backends", operation_id = "create_backend",
    params(WriteParams), request_body = BackendInput,
    responses((status = 201, body = BackendOut, headers(("ETag" = String), ("Sluice-Config-Version" = u64))),
              (status = 200, description = "dry run", body = DryRun<BackendOut>),
              (status = 400, body = Problem, content_type = "application/problem+json"),
              (status = 409, body = Problem, content_type = "application/problem+json"),
              (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create(
    State(app): State<AppState>,
    params: WriteParams,
    ApiJson(input): ApiJson<BackendInput>,
) -> Result<Response, ApiError> {
    let backend = input.into_backend(Uuid::new_v4(), None)?;
    let id = backend.id;
    let now = now_text();
    let mut tx = app.db.begin_write().await?;
    tx.upsert_backend(&backend, &now).await?;
    let stored = just_written(tx.get_backend(id).await?)?;
    let out = BackendOut::from(stored);
    commit(tx, &params, id, Written::Created(out)).await
}

/// Replace a backend.
#[utoipa::path(put, path = "/v1/backends/{id}", tag = "backends", operation_id = "update_backend",
    params(("id" = Uuid, Path), WriteParams, ("If-Match" = Option<String>, Header)), request_body = BackendInput,
    responses((status = 200, body = BackendOut, headers(("ETag" = String), ("Sluice-Config-Version" = u64))),
              (status = 404, body = Problem, content_type = "application/problem+json"),
              (status = 409, body = Problem, content_type = "application/problem+json"),
              (status = 412, body = Problem, content_type = "application/problem+json"),
              (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn update(
    State(app): State<AppState>,
    Path(id): Path<String>,
    params: WriteParams,
    if_match: IfMatch,
    ApiJson(input): ApiJson<BackendInput>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let mut tx = app.db.begin_write().await?;
    let old = found(tx.get_backend(id).await?, "backend", id)?;
    if_match.check(&etag_of(&BackendOut::from(old.clone())))?;
    let backend = input.into_backend(id, Some(&old.item))?;
    tx.upsert_backend(&backend, &now_text()).await?;
    let stored = just_written(tx.get_backend(id).await?)?;
    let out = BackendOut::from(stored);
    commit(tx, &params, id, Written::Replaced(out)).await
}

/// Delete a backend no host uses.
#[utoipa::path(delete, path = "/v1/backends/{id}", tag = "backends", operation_id = "delete_backend",
    params(("id" = Uuid, Path), WriteParams, ("If-Match" = Option<String>, Header)),
    responses((status = 204, headers(("Sluice-Config-Version" = u64))),
              (status = 200, description = "dry run", body = DryRun<BackendOut>),
              (status = 404, body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "hosts still use it", body = Problem, content_type = "application/problem+json"),
              (status = 412, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn delete(
    State(app): State<AppState>,
    Path(id): Path<String>,
    params: WriteParams,
    if_match: IfMatch,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let mut tx = app.db.begin_write().await?;
    let old = found(tx.get_backend(id).await?, "backend", id)?;
    if_match.check(&etag_of(&BackendOut::from(old.clone())))?;
    refuse_if_referenced(&mut tx, ObjectKind::Backend, id, &old.item.name).await?;
    tx.delete(ObjectKind::Backend, id).await?;
    commit::<BackendOut>(tx, &params, id, Written::Deleted).await
}

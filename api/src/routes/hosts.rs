//! `/v1/hosts`: hostnames, how each is served (terminate or passthrough) and where it goes.

use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use sluice_shared::validate::ObjectKind;
use sluice_shared::{Host, Hostname, Mode, ProxyProtocol, RequestHeaders};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{commit, etag_of, found, just_written, with_etag, DryRun, ObjectOut, Written};
use crate::db::{now_text, Stored, WriteTx};
use crate::error::{ApiError, FieldError, Problem};
use crate::extract::{parse_id, ApiJson, IfMatch, WriteParams};
use crate::AppState;

/// A host as sent by clients.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostInput {
    /// Exact (`redmine.beerme`) or one-label wildcard (`*.beerme`).
    pub hostname: String,
    pub mode: Mode,
    pub backend_id: Uuid,
    /// For terminate hosts; omit to use the best covering certificate.
    #[serde(default)]
    pub certificate_id: Option<Uuid>,
    /// Header names are matched case-insensitively and stored in lower case.
    #[serde(default)]
    pub request_headers: RequestHeaders,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
}

/// A stored host.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostOut {
    #[serde(flatten)]
    pub host: Host,
    pub created_at: String,
    pub updated_at: String,
}

impl ObjectOut for HostOut {
    const KIND: ObjectKind = ObjectKind::Host;
}

impl From<Stored<Host>> for HostOut {
    fn from(s: Stored<Host>) -> Self {
        HostOut {
            host: s.item,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

impl HostInput {
    /// Check syntax and references, then build the model; every problem is reported at once.
    async fn into_host(self, id: Uuid, tx: &mut WriteTx<'_>) -> Result<Host, ApiError> {
        let mut errors = Vec::new();
        let hostname = match self.hostname.parse::<Hostname>() {
            Ok(h) => Some(h),
            Err(e) => {
                errors.push(FieldError::new(
                    "hostname",
                    format!("`{}` {e}", self.hostname),
                ));
                None
            }
        };
        if tx.get_backend(self.backend_id).await?.is_none() {
            errors.push(FieldError::new(
                "backend_id",
                format!("no backend has id {}", self.backend_id),
            ));
        }
        if let Some(cid) = self.certificate_id {
            if tx.get_certificate(cid).await?.is_none() {
                errors.push(FieldError::new(
                    "certificate_id",
                    format!("no certificate has id {cid}"),
                ));
            }
        }
        let request_headers = crate::convert::lower_rules(self.request_headers);
        match hostname {
            Some(hostname) if errors.is_empty() => Ok(Host {
                id,
                hostname,
                mode: self.mode,
                backend_id: self.backend_id,
                certificate_id: self.certificate_id,
                request_headers,
                proxy_protocol: self.proxy_protocol,
            }),
            _ => Err(ApiError::invalid(errors)),
        }
    }
}

/// List hosts.
#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", operation_id = "list_hosts",
    responses((status = 200, body = Vec<HostOut>),
              (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(State(app): State<AppState>) -> Result<Json<Vec<HostOut>>, ApiError> {
    Ok(Json(
        app.db
            .list_hosts()
            .await?
            .into_iter()
            .map(HostOut::from)
            .collect(),
    ))
}

/// Show one host.
#[utoipa::path(get, path = "/v1/hosts/{id}", tag = "hosts", operation_id = "get_host",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = HostOut, headers(("ETag" = String))),
              (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let stored = found(app.db.get_host(id).await?, "host", id)?;
    Ok(with_etag(HostOut::from(stored)))
}

/// Create a host.
#[utoipa::path(post, path = "/v1/hosts", tag = "hosts", operation_id = "create_host",
    params(WriteParams), request_body = HostInput,
    responses((status = 201, body = HostOut, headers(("ETag" = String), ("Sluice-Config-Version" = u64))),
              (status = 200, description = "dry run", body = DryRun<HostOut>),
              (status = 400, body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "hostname taken", body = Problem, content_type = "application/problem+json"),
              (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create(
    State(app): State<AppState>,
    params: WriteParams,
    ApiJson(input): ApiJson<HostInput>,
) -> Result<Response, ApiError> {
    let id = Uuid::new_v4();
    let mut tx = app.db.begin_write().await?;
    let host = input.into_host(id, &mut tx).await?;
    tx.upsert_host(&host, &now_text()).await?;
    let stored = just_written(tx.get_host(id).await?)?;
    let out = HostOut::from(stored);
    commit(tx, &params, id, Written::Created(out)).await
}

/// Replace a host.
#[utoipa::path(put, path = "/v1/hosts/{id}", tag = "hosts", operation_id = "update_host",
    params(("id" = Uuid, Path), WriteParams, ("If-Match" = Option<String>, Header)), request_body = HostInput,
    responses((status = 200, body = HostOut, headers(("ETag" = String), ("Sluice-Config-Version" = u64))),
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
    ApiJson(input): ApiJson<HostInput>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let mut tx = app.db.begin_write().await?;
    let old = found(tx.get_host(id).await?, "host", id)?;
    if_match.check(&etag_of(&HostOut::from(old)))?;
    let host = input.into_host(id, &mut tx).await?;
    tx.upsert_host(&host, &now_text()).await?;
    let stored = just_written(tx.get_host(id).await?)?;
    let out = HostOut::from(stored);
    commit(tx, &params, id, Written::Replaced(out)).await
}

/// Delete a host.
#[utoipa::path(delete, path = "/v1/hosts/{id}", tag = "hosts", operation_id = "delete_host",
    params(("id" = Uuid, Path), WriteParams, ("If-Match" = Option<String>, Header)),
    responses((status = 204, headers(("Sluice-Config-Version" = u64))),
              (status = 200, description = "dry run", body = DryRun<HostOut>),
              (status = 404, body = Problem, content_type = "application/problem+json"),
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
    let old = found(tx.get_host(id).await?, "host", id)?;
    if_match.check(&etag_of(&HostOut::from(old)))?;
    tx.delete(ObjectKind::Host, id).await?;
    commit::<HostOut>(tx, &params, id, Written::Deleted).await
}

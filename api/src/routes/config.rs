//! `/v1/config`: the current version, the version history, restoring an old version, and
//! pruning the private keys no current certificate uses.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use sluice_shared::{Config, ConfigVersion};
use utoipa::{IntoParams, ToSchema};

use super::{found, write_response, DryRun};
use crate::commit::{finish, Finish};
use crate::db::{now_text, VersionRow};
use crate::document::ConfigDocument;
use crate::error::{ApiError, Problem};
use crate::extract::{ApiQuery, WriteParams};
use crate::AppState;

/// The configuration version in force.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfigInfo {
    pub version: ConfigVersion,
    /// sha256 of the canonical configuration.
    pub hash: String,
    pub created_at: String,
}

/// One entry of the version history.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionInfo {
    pub version: ConfigVersion,
    pub hash: String,
    pub created_at: String,
    /// One line saying what changed.
    pub summary: String,
    /// Set when this version was made by restoring an older one.
    pub restored_from: Option<u64>,
}

impl From<VersionRow> for VersionInfo {
    fn from(r: VersionRow) -> Self {
        VersionInfo {
            version: r.version,
            hash: r.hash,
            created_at: r.created_at,
            summary: r.summary,
            restored_from: r.restored_from,
        }
    }
}

/// A version with its whole configuration; private keys are never included.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionDetail {
    #[serde(flatten)]
    pub info: VersionInfo,
    pub config: Config,
}

/// Paging of the version history.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// At most this many versions (1-1000, default 100).
    pub limit: Option<u32>,
    /// Only versions older than this one.
    pub before: Option<u64>,
}

fn version_etag(v: ConfigVersion) -> HeaderValue {
    HeaderValue::from_str(&format!("\"v{v}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

fn parse_version(raw: &str) -> Result<ConfigVersion, ApiError> {
    raw.parse::<u64>()
        .ok()
        .and_then(|v| ConfigVersion::try_from(v).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "version",
                format!("`{raw}` is not a version number (1, 2, ...)"),
            )
        })
}

/// The current configuration version.
#[utoipa::path(get, path = "/v1/config", tag = "config", operation_id = "get_config",
    responses((status = 200, body = ConfigInfo, headers(("ETag" = String))),
              (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn current(State(app): State<AppState>) -> Result<Response, ApiError> {
    let row = app
        .db
        .current_version()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no version committed"))?;
    let etag = version_etag(row.version);
    let mut resp = Json(ConfigInfo {
        version: row.version,
        hash: row.hash,
        created_at: row.created_at,
    })
    .into_response();
    resp.headers_mut().insert(header::ETAG, etag);
    Ok(resp)
}

/// The version history, newest first.
#[utoipa::path(get, path = "/v1/config/versions", tag = "config", operation_id = "list_config_versions",
    params(HistoryParams),
    responses((status = 200, body = Vec<VersionInfo>),
              (status = 400, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn history(
    State(app): State<AppState>,
    ApiQuery(params): ApiQuery<HistoryParams>,
) -> Result<Json<Vec<VersionInfo>>, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit", "must be 1 to 1000"));
    }
    let rows = app.db.list_versions(limit, params.before).await?;
    Ok(Json(rows.into_iter().map(VersionInfo::from).collect()))
}

/// One version and its configuration, keys redacted.
#[utoipa::path(get, path = "/v1/config/versions/{version}", tag = "config", operation_id = "get_config_version",
    params(("version" = u64, Path)),
    responses((status = 200, body = VersionDetail),
              (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn version(
    State(app): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let v = parse_version(&raw)?;
    let (row, config) = found(app.db.get_version(v).await?, "version", v)?;
    let mut resp = Json(VersionDetail {
        info: row.into(),
        config: config.redacted(),
    })
    .into_response();
    resp.headers_mut().insert(header::ETAG, version_etag(v));
    Ok(resp)
}

/// What pruning the stored private keys removed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PrunedKeys {
    /// Set on a dry run: nothing was removed.
    pub dry_run: bool,
    /// sha256 of every key removed (or, on a dry run, that would be): keys no certificate of
    /// the current configuration uses, left by deleted certificates and replaced keys. The
    /// versions that used them can no longer be restored.
    pub removed: Vec<String>,
    /// Keys kept: those the current configuration's certificates use.
    pub kept: u64,
    /// Whether the database files were cleared of the removed keys' bytes as well (deleted
    /// rows are overwritten with zeros and the write-ahead log is emptied). False on a dry run,
    /// and when a long read kept the log from being emptied: pruning again clears it.
    pub scrubbed: bool,
}

/// Remove the stored private keys no current certificate uses.
///
/// Private keys are kept after their certificate is deleted or given a new key, so that older
/// versions can be restored. This removes every key the current configuration does not use
/// (restoring a version that needs one answers 409 after it), and clears their bytes from the
/// database files. It changes no configuration, so it makes no new version.
#[utoipa::path(post, path = "/v1/config/prune-keys", tag = "config", operation_id = "prune_keys",
    params(WriteParams),
    responses((status = 200, body = PrunedKeys),
              (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn prune_keys(
    State(app): State<AppState>,
    params: WriteParams,
) -> Result<Json<PrunedKeys>, ApiError> {
    let mut tx = app.db.begin_write().await?;
    let (removed, kept) = tx.key_use().await?;
    if params.dry_run || removed.is_empty() {
        // A dry run, or nothing to remove: the transaction is rolled back when dropped.
        drop(tx);
        let scrubbed = !params.dry_run && app.db.checkpoint().await?;
        return Ok(Json(PrunedKeys {
            dry_run: params.dry_run,
            removed,
            kept,
            scrubbed,
        }));
    }
    tx.delete_unused_keys().await?;
    tx.commit_unversioned().await?;
    let scrubbed = app.db.checkpoint().await?;
    tracing::info!(removed = ?removed, kept, scrubbed, "pruned unused private keys");
    Ok(Json(PrunedKeys {
        dry_run: false,
        removed,
        kept,
        scrubbed,
    }))
}

/// Commit a new version whose configuration equals an older one.
#[utoipa::path(post, path = "/v1/config/versions/{version}/restore", tag = "config", operation_id = "restore_config_version",
    params(("version" = u64, Path), WriteParams),
    responses((status = 201, body = VersionInfo, headers(("Sluice-Config-Version" = u64))),
              (status = 200, description = "dry run, or nothing to change", body = DryRun<VersionInfo>),
              (status = 404, body = Problem, content_type = "application/problem+json"),
              (status = 409, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn restore(
    State(app): State<AppState>,
    Path(raw): Path<String>,
    params: WriteParams,
) -> Result<Response, ApiError> {
    let v = parse_version(&raw)?;
    let mut tx = app.db.begin_write().await?;
    let (_, config) = found(tx.version(v).await?, "version", v)?;
    for cert in &config.certificates {
        if tx.key_pem(&cert.key_sha256).await?.is_none() {
            return Err(ApiError::Conflict {
                detail: format!(
                    "the private key of certificate `{}` in version {v} is no longer stored",
                    cert.name
                ),
                errors: vec![],
            });
        }
    }
    tx.replace_config(&config, &now_text()).await?;
    let outcome = finish(
        tx,
        Finish {
            dry_run: params.dry_run,
            restored_from: Some(v),
            ..Finish::default()
        },
    )
    .await?;
    // After a commit the newest version is ours (we held the write lock until it was done).
    let info = match outcome.dry_run {
        true => None,
        false => app.db.current_version().await?.map(VersionInfo::from),
    };
    let status = if outcome.committed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(write_response(status, &outcome, info, None))
}

/// One worker's position for one version.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RolloutEntry {
    pub worker_id: uuid::Uuid,
    pub name: String,
    pub managed: bool,
    pub connected: bool,
    /// `applied`, `rejected`, `pending`, or `superseded` (the worker moved past this version
    /// without applying it).
    pub status: String,
    /// The worker's reason, for `rejected`.
    pub error: Option<String>,
    /// When the worker answered.
    pub at: Option<String>,
    /// The version the worker serves now.
    pub applied_version: Option<u64>,
}

/// Where every known worker stands with a version.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Rollout {
    pub version: ConfigVersion,
    pub workers: Vec<RolloutEntry>,
}

/// Every known worker as pending, applied or rejected for this version.
#[utoipa::path(get, path = "/v1/config/versions/{version}/rollout", tag = "config", operation_id = "get_rollout",
    params(("version" = u64, Path)),
    responses((status = 200, body = Rollout),
              (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn rollout(
    State(app): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<Rollout>, ApiError> {
    let v = parse_version(&raw)?;
    found(app.db.version_row(v).await?, "version", v)?;
    let workers = app
        .db
        .rollout(v)
        .await?
        .into_iter()
        .map(|(w, answer)| {
            let (status, error, at) = match answer {
                Some(a) => (a.status, a.error, Some(a.at)),
                None if w.applied_version.is_some_and(|a| a > v.get()) => {
                    ("superseded".to_owned(), None, None)
                }
                None => ("pending".to_owned(), None, None),
            };
            RolloutEntry {
                worker_id: w.id,
                connected: app.workers.is_connected(w.id),
                name: w.name,
                managed: w.managed,
                status,
                error,
                at,
                applied_version: w.applied_version,
            }
        })
        .collect();
    Ok(Json(Rollout {
        version: v,
        workers,
    }))
}

/// The outcome of applying a whole configuration document.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Applied {
    /// The new version; the current one when nothing changed; the would-be one on a dry run.
    pub version: ConfigVersion,
    /// Did (or would) the document change anything?
    pub changed: bool,
    pub dry_run: bool,
    pub diff: sluice_shared::diff::Diff,
}

/// The whole configuration as one portable document (names instead of ids, no keys).
#[utoipa::path(get, path = "/v1/config/export", tag = "config", operation_id = "export_config",
    responses((status = 200, body = ConfigDocument, headers(("ETag" = String, description = "the config version, for If-Match on PUT /v1/config"))),
              (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn export(State(app): State<AppState>) -> Result<Response, ApiError> {
    let row = app
        .db
        .current_version()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no version committed"))?;
    let (_, config) = app
        .db
        .get_version(row.version)
        .await?
        .ok_or_else(|| anyhow::anyhow!("current version vanished"))?;
    let doc = tokio::task::spawn_blocking(move || crate::document::export(&config))
        .await
        .map_err(|e| anyhow::anyhow!("export failed: {e}"))?;
    let mut resp = Json(doc).into_response();
    resp.headers_mut()
        .insert(header::ETAG, version_etag(row.version));
    Ok(resp)
}

/// Make the stored configuration equal to a document, as exactly one new version (or none
/// when nothing differs). Everything is validated first and every problem is reported with
/// its JSON path; nothing of an invalid document is stored.
#[utoipa::path(put, path = "/v1/config", tag = "config", operation_id = "apply_config",
    params(WriteParams, ("If-Match" = Option<String>, Header, description = "ETag of GET /v1/config or /v1/config/export")),
    request_body = ConfigDocument,
    responses((status = 200, body = Applied, headers(("Sluice-Config-Version" = u64))),
              (status = 400, body = Problem, content_type = "application/problem+json"),
              (status = 409, body = Problem, content_type = "application/problem+json"),
              (status = 412, body = Problem, content_type = "application/problem+json"),
              (status = 413, body = Problem, content_type = "application/problem+json"),
              (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn apply(
    State(app): State<AppState>,
    params: WriteParams,
    if_match: crate::extract::IfMatch,
    crate::extract::ApiJson(doc): crate::extract::ApiJson<ConfigDocument>,
) -> Result<Response, ApiError> {
    let mut tx = app.db.begin_write().await?;
    let (row, current) = tx
        .current()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no version committed"))?;
    if_match.check(version_etag(row.version).to_str().unwrap_or_default())?;
    let current = current.clone();
    let now = time::OffsetDateTime::now_utc();
    let resolved =
        tokio::task::spawn_blocking(move || crate::document::resolve(doc, &current, now))
            .await
            .map_err(|e| anyhow::anyhow!("resolving the document failed: {e}"))?
            .map_err(ApiError::invalid)?;
    let stamp = now_text();
    for key in &resolved.keys {
        tx.put_key(&key.sha256, &key.pem, &stamp).await?;
    }
    tx.replace_config(&resolved.config, &stamp).await?;
    let how = Finish {
        dry_run: params.dry_run,
        paths: Some(std::sync::Arc::new(resolved.paths)),
        ..Finish::default()
    };
    let outcome = finish(tx, how).await?;
    let mut resp = Json(Applied {
        version: outcome.version,
        changed: !outcome.diff.is_empty(),
        dry_run: outcome.dry_run,
        diff: outcome.diff,
    })
    .into_response();
    resp.headers_mut().insert(
        super::CONFIG_VERSION_HEADER.clone(),
        HeaderValue::from(outcome.version.get()),
    );
    Ok(resp)
}

//! REST handlers, one module per resource, and the response helpers they share: ETags, the
//! `Sluice-Config-Version` header, and the dry-run envelope.

pub mod backends;
pub mod certificates;
pub mod config;
pub mod events;
pub mod health;
pub mod hosts;
pub mod ops;
pub mod workers;

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use sluice_shared::diff::Diff;
use sluice_shared::ConfigVersion;
use utoipa::ToSchema;

use crate::commit::Outcome;

/// Header carrying the configuration version a write produced (or the current one).
pub static CONFIG_VERSION_HEADER: HeaderName = HeaderName::from_static("sluice-config-version");

/// Strong ETag of a resource representation.
pub fn etag_of<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    format!("\"{}\"", &sluice_shared::certs::sha256_hex(&bytes)[..24])
}

/// What a `?dry_run=true` write answers: the would-be result and what would change.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DryRun<T> {
    /// Always true.
    pub dry_run: bool,
    /// The version the write would create; the current one when it would change nothing.
    pub version: ConfigVersion,
    /// Would the write create a new version?
    pub changed: bool,
    pub diff: Diff,
    /// The resource as it would be stored (null for a delete).
    pub result: Option<T>,
}

/// Build the response to a write: the resource with its ETag and the config version, or the
/// dry-run envelope.
pub fn write_response<T: Serialize>(
    status: StatusCode,
    outcome: &Outcome,
    result: Option<T>,
    location: Option<String>,
) -> Response {
    let version = HeaderValue::from(outcome.version.get());
    if outcome.dry_run {
        let body = DryRun {
            dry_run: true,
            version: outcome.version,
            changed: !outcome.diff.is_empty(),
            diff: outcome.diff.clone(),
            result,
        };
        return (StatusCode::OK, Json(body)).into_response();
    }
    let mut resp = match &result {
        Some(r) => {
            let etag = etag_of(r);
            let mut resp = (status, Json(r)).into_response();
            if let Ok(v) = HeaderValue::from_str(&etag) {
                resp.headers_mut().insert(header::ETAG, v);
            }
            resp
        }
        None => StatusCode::NO_CONTENT.into_response(),
    };
    resp.headers_mut()
        .insert(CONFIG_VERSION_HEADER.clone(), version);
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    resp
}

/// A resource with its ETag header.
pub fn with_etag<T: Serialize>(value: T) -> Response {
    let etag = etag_of(&value);
    let mut resp = Json(value).into_response();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// 409 naming the hosts that still refer to a backend or certificate.
pub async fn refuse_if_referenced(
    tx: &mut crate::db::WriteTx<'_>,
    kind: sluice_shared::validate::ObjectKind,
    id: uuid::Uuid,
    name: &str,
) -> Result<(), crate::error::ApiError> {
    let hosts = tx.referrers(kind, id).await?;
    if hosts.is_empty() {
        return Ok(());
    }
    let errors = hosts
        .iter()
        .map(|h| {
            crate::error::FieldError::new(
                format!("hosts[{h}]"),
                format!("uses {} `{name}`", kind.singular()),
            )
        })
        .collect();
    Err(crate::error::ApiError::Conflict {
        detail: format!(
            "{} `{name}` is still used by hosts: {}",
            kind.singular(),
            hosts.join(", ")
        ),
        errors,
    })
}

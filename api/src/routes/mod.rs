//! REST handlers, one module per resource, and the helpers they share: ETags, the
//! `Sluice-Config-Version` header, the dry-run envelope, and how a write to one object ends.

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

use sluice_shared::validate::ObjectKind;
use uuid::Uuid;

use crate::commit::{finish, Finish, Outcome};
use crate::db::WriteTx;
use crate::error::ApiError;
use crate::extract::WriteParams;

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

/// The representation of one kind of object (`BackendOut` shows backends): what a write to it
/// answers with.
pub trait ObjectOut: Serialize {
    const KIND: ObjectKind;
}

/// What a write did to one backend, certificate or host, with the object as it now reads.
pub enum Written<T> {
    /// A new object: 201 with its `Location`.
    Created(T),
    /// A replaced one: 200.
    Replaced(T),
    /// A deleted one: 204.
    Deleted,
}

/// End a write to one object: check the whole configuration, commit it as one new version (or
/// roll it back for a dry run; problems are named by the object's own fields, and a delete's
/// effects on other objects are conflicts) and answer.
pub async fn commit<T: ObjectOut>(
    tx: WriteTx<'_>,
    params: &WriteParams,
    id: Uuid,
    written: Written<T>,
) -> Result<Response, ApiError> {
    let kind = T::KIND;
    let how = Finish {
        dry_run: params.dry_run,
        subject: Some((kind, id)),
        deleting: matches!(written, Written::Deleted),
        ..Finish::default()
    };
    let outcome = finish(tx, how).await?;
    let (status, result, location) = match written {
        Written::Created(out) => {
            let location = format!("/v1/{}/{id}", kind.collection());
            (StatusCode::CREATED, Some(out), Some(location))
        }
        Written::Replaced(out) => (StatusCode::OK, Some(out), None),
        Written::Deleted => (StatusCode::NO_CONTENT, None, None),
    };
    Ok(write_response(status, &outcome, result, location))
}

/// The object a path names, or 404 naming `what` (say "host") and the id.
pub fn found<T>(row: Option<T>, what: &'static str, id: impl ToString) -> Result<T, ApiError> {
    row.ok_or_else(|| ApiError::NotFound {
        what,
        id: id.to_string(),
    })
}

/// The row a write just stored, read back in its transaction (it is there unless the database
/// is broken).
pub fn just_written<T>(row: Option<T>) -> Result<T, ApiError> {
    row.ok_or_else(|| anyhow::anyhow!("the row just written cannot be read back").into())
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
    tx: &mut WriteTx<'_>,
    kind: ObjectKind,
    id: Uuid,
    name: &str,
) -> Result<(), ApiError> {
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
    Err(ApiError::Conflict {
        detail: format!(
            "{} `{name}` is still used by hosts: {}",
            kind.singular(),
            hosts.join(", ")
        ),
        errors,
    })
}

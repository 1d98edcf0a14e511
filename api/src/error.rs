//! The API's one error type and its RFC 9457 `application/problem+json` rendering.
//!
//! Every handler returns `Result<_, ApiError>`. Client mistakes map to 4xx with the offending
//! field named in `errors`; anything else is a 500 whose body says nothing about internals while
//! the cause chain is logged once, here.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::db::DbError;

/// One problem with one field of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// Path of the field, e.g. `servers[1].address`, or `hosts[redmine.beerme].certificate_id`
    /// for a problem the change causes in another object.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Per-field problems; empty when the problem is not about a field.
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    BadRequest {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("no {what} has id {id}")]
    NotFound { what: &'static str, id: String },
    #[error("{detail}")]
    Conflict {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("the resource changed: If-Match {given} does not match the current ETag {current}")]
    PreconditionFailed { given: String, current: String },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("{detail}")]
    Invalid {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{detail}")]
    Timeout { detail: String },
    #[error("database error")]
    Database(#[source] DbError),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// A 422 about a single field.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let e = FieldError::new(field, message);
        ApiError::Invalid {
            detail: format!("{}: {}", e.field, e.message),
            errors: vec![e],
        }
    }

    /// A 422 listing several field errors.
    pub fn invalid(errors: Vec<FieldError>) -> Self {
        let detail = summarize(&errors);
        ApiError::Invalid { detail, errors }
    }

    /// A 400 about a single field (or the body as a whole when `field` is empty).
    pub fn bad_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        let e = FieldError::new(field, message);
        let detail = if e.field.is_empty() {
            e.message.clone()
        } else {
            format!("{}: {}", e.field, e.message)
        };
        let errors = if e.field.is_empty() { vec![] } else { vec![e] };
        ApiError::BadRequest { detail, errors }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Database(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "bad-request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound { .. } => "not-found",
            ApiError::Conflict { .. } => "conflict",
            ApiError::PreconditionFailed { .. } => "precondition-failed",
            ApiError::PayloadTooLarge { .. } => "payload-too-large",
            ApiError::UnsupportedMediaType => "unsupported-media-type",
            ApiError::Invalid { .. } => "validation",
            ApiError::Timeout { .. } => "timeout",
            ApiError::Database(_) | ApiError::Internal(_) => "internal",
        }
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        let errors = match self {
            ApiError::BadRequest { errors, .. }
            | ApiError::Conflict { errors, .. }
            | ApiError::Invalid { errors, .. } => errors.clone(),
            _ => Vec::new(),
        };
        Problem {
            kind: format!("urn:sluice:problem:{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            errors,
        }
    }
}

/// `a: x; b: y` from a list of field errors.
pub fn summarize(errors: &[FieldError]) -> String {
    let parts: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect();
    parts.join("; ")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            // The only place a server-side failure is logged; the client learns nothing more.
            tracing::error!(error = ?self, "request failed");
        }
        let problem = self.problem();
        let mut resp = (
            self.status(),
            serde_json::to_vec(&problem).unwrap_or_default(),
        )
            .into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="sluice""#),
            );
        }
        resp
    }
}

impl From<DbError> for ApiError {
    /// Constraint violations are the client's doing (409/422); anything else is ours (500).
    fn from(e: DbError) -> Self {
        if let DbError::Sqlx(sqlx::Error::Database(db)) = &e {
            let msg = db.message();
            // SQLite says e.g. "UNIQUE constraint failed: hosts.hostname".
            let field = msg
                .rsplit_once(": ")
                .map(|(_, col)| col.rsplit('.').next().unwrap_or(col));
            if db.is_unique_violation() {
                let field = field.unwrap_or("name").to_owned();
                return ApiError::Conflict {
                    detail: format!("{field}: the value is already used by another object"),
                    errors: vec![FieldError::new(field, "is already used by another object")],
                };
            }
            if db.is_foreign_key_violation() {
                return ApiError::Conflict {
                    detail: "the change refers to an object that does not exist, or removes one still referred to".into(),
                    errors: vec![],
                };
            }
        }
        ApiError::Database(e)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::from(DbError::from(e))
    }
}

//! Request extractors whose failures are problem documents naming the field: JSON bodies,
//! `?dry_run=`, `If-Match`, and ids in paths.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::error::ApiError;

/// Default cap on request bodies.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// A JSON body: 415 without a JSON content type, 413 over the limit, 400 naming the field for
/// malformed JSON, unknown fields and wrong types.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(BODY_LIMIT, |l| l.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::bad_request("", format!("could not read the request body: {rejection}"))
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// The body limit in force for a route, set by the router as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Deserialize JSON, naming the path of the first offending field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." { String::new() } else { path };
        ApiError::bad_request(field, clean_serde_message(&inner))
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request("", clean_serde_message(&e)))?;
    Ok(value)
}

fn clean_serde_message(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    // serde_json appends " at line L column C"; keep it only for syntax errors, where it helps.
    if e.is_syntax() || e.is_eof() {
        format!("malformed JSON: {msg}")
    } else {
        match msg.rfind(" at line ") {
            Some(i) => msg[..i].to_owned(),
            None => msg,
        }
    }
}

/// `?dry_run=true`: validate and show the result and diff, commit nothing.
#[derive(Debug, Default, Clone, Copy, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WriteParams {
    /// Validate and return the would-be result and diff without committing.
    #[serde(default)]
    pub dry_run: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for WriteParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let mut params = WriteParams::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
            if k == "dry_run" {
                params.dry_run = match v {
                    "true" | "1" | "" => true,
                    "false" | "0" => false,
                    other => {
                        return Err(ApiError::bad_request(
                            "dry_run",
                            format!("`{other}` is not true or false"),
                        ))
                    }
                };
            }
        }
        Ok(params)
    }
}

/// The `If-Match` header, if any: a list of entity tags or `*`.
#[derive(Debug, Clone, Default)]
pub struct IfMatch(pub Option<String>);

impl IfMatch {
    /// Check the header against the current ETag (412 when it names none of them).
    pub fn check(&self, current: &str) -> Result<(), ApiError> {
        let Some(given) = &self.0 else { return Ok(()) };
        let ok = given
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t == current || t.strip_prefix("W/") == Some(current));
        if ok {
            Ok(())
        } else {
            Err(ApiError::PreconditionFailed {
                given: given.clone(),
                current: current.to_owned(),
            })
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get(header::IF_MATCH) {
            None => Ok(IfMatch(None)),
            Some(v) => v
                .to_str()
                .map(|s| IfMatch(Some(s.to_owned())))
                .map_err(|_| ApiError::bad_request("If-Match", "is not valid ASCII")),
        }
    }
}

/// Parse an id from a path segment (400 naming it when it is not a UUID).
pub fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request("id", format!("`{raw}` is not a UUID")))
}

/// Query parameters whose parse failure is a 400 problem document.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::bad_request("", format!("bad query string: {}", e.body_text())))
    }
}

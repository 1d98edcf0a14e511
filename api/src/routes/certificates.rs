//! `/v1/certificates`: certificate chains and their write-only private keys.

use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use sluice_shared::certs::{self, CertFacts};
use sluice_shared::validate::ObjectKind;
use sluice_shared::Certificate;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{commit, etag_of, found, just_written, with_etag, DryRun, ObjectOut, Written};
use crate::db::{now_text, Stored};
use crate::error::{ApiError, FieldError, Problem};
use crate::extract::{parse_id, ApiJson, IfMatch, WriteParams};
use crate::AppState;

/// A certificate to store. The key is write-only: no response ever contains it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateInput {
    pub name: String,
    /// PEM chain, leaf first.
    pub cert_pem: String,
    /// PEM private key of the leaf. Required on create; on update, omit it to keep the stored
    /// key (which must then match the new leaf).
    #[serde(default)]
    pub key_pem: Option<String>,
}

/// A stored certificate, as shown: facts of its leaf, never its key.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CertificateOut {
    pub id: Uuid,
    pub name: String,
    pub subject: String,
    pub sans: Vec<String>,
    pub issuer: String,
    pub not_before: String,
    pub not_after: String,
    pub fingerprint_sha256: String,
    pub created_at: String,
    pub updated_at: String,
    /// Things that work but may surprise (single-label wildcards, not yet valid).
    pub warnings: Vec<String>,
}

impl ObjectOut for CertificateOut {
    const KIND: ObjectKind = ObjectKind::Certificate;
}

impl CertificateOut {
    fn new(s: &Stored<Certificate>, facts: &CertFacts) -> Self {
        CertificateOut {
            id: s.item.id,
            name: s.item.name.clone(),
            subject: facts.subject.clone(),
            sans: facts.sans.clone(),
            issuer: facts.issuer.clone(),
            not_before: certs::rfc3339(facts.not_before),
            not_after: certs::rfc3339(facts.not_after),
            fingerprint_sha256: facts.fingerprint_sha256.clone(),
            created_at: s.created_at.clone(),
            updated_at: s.updated_at.clone(),
            warnings: certs::warnings(facts, OffsetDateTime::now_utc()),
        }
    }

    fn from_stored(s: &Stored<Certificate>) -> Result<Self, ApiError> {
        let facts = certs::inspect_chain(&s.item.cert_pem)
            .map_err(|e| anyhow::anyhow!("stored certificate {} does not parse: {e}", s.item.id))?;
        Ok(Self::new(s, &facts))
    }
}

/// Check the chain and, when given, the key; everything wrong is reported at once.
fn check_input(input: &CertificateInput, key_required: bool) -> Result<CertFacts, ApiError> {
    let mut errors = Vec::new();
    if input.name.trim().is_empty() {
        errors.push(FieldError::new("name", "must not be empty"));
    }
    let facts = match certs::inspect_chain(&input.cert_pem) {
        Ok(f) => {
            if let Err(e) = certs::check_not_expired(&f, OffsetDateTime::now_utc()) {
                errors.push(FieldError::new("cert_pem", e.to_string()));
            }
            Some(f)
        }
        Err(e) => {
            errors.push(FieldError::new("cert_pem", e.to_string()));
            None
        }
    };
    match &input.key_pem {
        None if key_required => errors.push(FieldError::new("key_pem", "is required")),
        Some(key) if facts.is_some() => {
            if let Err(e) = certs::check_key_matches(&input.cert_pem, key) {
                errors.push(FieldError::new("key_pem", e.to_string()));
            }
        }
        _ => {}
    }
    match facts {
        Some(f) if errors.is_empty() => Ok(f),
        _ => Err(ApiError::invalid(errors)),
    }
}

/// List certificates.
#[utoipa::path(get, path = "/v1/certificates", tag = "certificates", operation_id = "list_certificates",
    responses((status = 200, body = Vec<CertificateOut>),
              (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(State(app): State<AppState>) -> Result<Json<Vec<CertificateOut>>, ApiError> {
    let rows = app.db.list_certificates().await?;
    Ok(Json(
        rows.iter()
            .map(CertificateOut::from_stored)
            .collect::<Result<_, _>>()?,
    ))
}

/// Show one certificate.
#[utoipa::path(get, path = "/v1/certificates/{id}", tag = "certificates", operation_id = "get_certificate",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = CertificateOut, headers(("ETag" = String))),
              (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let stored = found(app.db.get_certificate(id).await?, "certificate", id)?;
    Ok(with_etag(CertificateOut::from_stored(&stored)?))
}

/// Store a new certificate and its key.
#[utoipa::path(post, path = "/v1/certificates", tag = "certificates", operation_id = "create_certificate",
    params(WriteParams), request_body = CertificateInput,
    responses((status = 201, body = CertificateOut, headers(("ETag" = String), ("Sluice-Config-Version" = u64))),
              (status = 200, description = "dry run", body = DryRun<CertificateOut>),
              (status = 400, body = Problem, content_type = "application/problem+json"),
              (status = 409, body = Problem, content_type = "application/problem+json"),
              (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create(
    State(app): State<AppState>,
    params: WriteParams,
    ApiJson(input): ApiJson<CertificateInput>,
) -> Result<Response, ApiError> {
    check_input(&input, true)?;
    let key = input.key_pem.as_deref().unwrap_or_default();
    let cert = Certificate {
        id: Uuid::new_v4(),
        name: input.name.clone(),
        cert_pem: input.cert_pem.clone(),
        key_sha256: certs::sha256_hex(key.as_bytes()),
        key_pem: None,
    };
    let now = now_text();
    let mut tx = app.db.begin_write().await?;
    tx.put_key(&cert.key_sha256, key, &now).await?;
    tx.upsert_certificate(&cert, &now).await?;
    let stored = just_written(tx.get_certificate(cert.id).await?)?;
    let out = CertificateOut::from_stored(&stored)?;
    commit(tx, &params, cert.id, Written::Created(out)).await
}

/// Replace a certificate (and optionally its key).
#[utoipa::path(put, path = "/v1/certificates/{id}", tag = "certificates", operation_id = "update_certificate",
    params(("id" = Uuid, Path), WriteParams, ("If-Match" = Option<String>, Header)), request_body = CertificateInput,
    responses((status = 200, body = CertificateOut, headers(("ETag" = String), ("Sluice-Config-Version" = u64))),
              (status = 404, body = Problem, content_type = "application/problem+json"),
              (status = 412, body = Problem, content_type = "application/problem+json"),
              (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn update(
    State(app): State<AppState>,
    Path(id): Path<String>,
    params: WriteParams,
    if_match: IfMatch,
    ApiJson(input): ApiJson<CertificateInput>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    check_input(&input, false)?;
    let now = now_text();
    let mut tx = app.db.begin_write().await?;
    let old = found(tx.get_certificate(id).await?, "certificate", id)?;
    if_match.check(&etag_of(&CertificateOut::from_stored(&old)?))?;
    let key_sha256 = match &input.key_pem {
        Some(key) => {
            let sha = certs::sha256_hex(key.as_bytes());
            tx.put_key(&sha, key, &now).await?;
            sha
        }
        None => {
            let stored_key = tx
                .key_pem(&old.item.key_sha256)
                .await?
                .ok_or_else(|| anyhow::anyhow!("stored key missing"))?;
            certs::check_key_matches(&input.cert_pem, &stored_key).map_err(|e| {
                ApiError::invalid_field(
                    "key_pem",
                    format!("the stored key cannot serve the new certificate ({e}); send key_pem"),
                )
            })?;
            old.item.key_sha256.clone()
        }
    };
    let cert = Certificate {
        id,
        name: input.name,
        cert_pem: input.cert_pem,
        key_sha256,
        key_pem: None,
    };
    tx.upsert_certificate(&cert, &now).await?;
    let stored = just_written(tx.get_certificate(id).await?)?;
    let out = CertificateOut::from_stored(&stored)?;
    commit(tx, &params, id, Written::Replaced(out)).await
}

/// Delete a certificate no host uses.
#[utoipa::path(delete, path = "/v1/certificates/{id}", tag = "certificates", operation_id = "delete_certificate",
    params(("id" = Uuid, Path), WriteParams, ("If-Match" = Option<String>, Header)),
    responses((status = 204, headers(("Sluice-Config-Version" = u64))),
              (status = 200, description = "dry run", body = DryRun<CertificateOut>),
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
    let old = found(tx.get_certificate(id).await?, "certificate", id)?;
    if_match.check(&etag_of(&CertificateOut::from_stored(&old)?))?;
    super::refuse_if_referenced(&mut tx, ObjectKind::Certificate, id, &old.item.name).await?;
    tx.delete(ObjectKind::Certificate, id).await?;
    commit::<CertificateOut>(tx, &params, id, Written::Deleted).await
}

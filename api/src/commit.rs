//! Turning a write transaction into exactly one new configuration version.
//!
//! Every write handler changes rows inside a [`WriteTx`] and then calls [`finish`], which
//! compiles the whole configuration from those rows, runs the shared validation, compares its
//! hash with the current version and then commits the rows together with the new version row,
//! or rolls back (dry run, no change, or invalid). Nothing is ever half-applied.

use std::sync::Arc;

use sluice_shared::diff::{diff, Diff};
use sluice_shared::hash::config_hash;
use sluice_shared::validate::{validate, validate_with, Invalid, ObjectKind, ProblemKind};
use sluice_shared::{Config, ConfigVersion};
use uuid::Uuid;

use crate::db::{now_text, Db, DbError, VersionRow, WriteTx};
use crate::error::{summarize, ApiError, FieldError};

/// What a write is about, so problems can be named relative to it.
#[derive(Debug, Clone, Default)]
pub struct Finish {
    pub dry_run: bool,
    /// The object being written: its problems are named by bare field.
    pub subject: Option<(ObjectKind, Uuid)>,
    /// A delete: problems it causes in other objects are conflicts (409), not bad values.
    pub deleting: bool,
    /// Set by a restore: the version being restored.
    pub restored_from: Option<ConfigVersion>,
    /// JSON path of each object (for whole-document writes), used to name problems.
    pub paths: Option<std::sync::Arc<std::collections::HashMap<(ObjectKind, Uuid), String>>>,
}

/// The result of a write.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The new version; the current one when nothing changed; the would-be one on a dry run.
    pub version: ConfigVersion,
    pub committed: bool,
    pub dry_run: bool,
    pub diff: Diff,
}

/// Name problems relative to the written object and pick 409 or 422.
pub fn problems_to_error(invalid: Invalid, how: &Finish) -> ApiError {
    let conflict = how.deleting || invalid.0.iter().any(|p| p.kind == ProblemKind::Conflict);
    let errors: Vec<FieldError> = invalid
        .0
        .into_iter()
        .map(|p| {
            let path = how.paths.as_ref().and_then(|m| m.get(&(p.object, p.id)));
            let field = if let Some(path) = path {
                format!("{path}.{}", p.field)
            } else if how.subject == Some((p.object, p.id)) {
                p.field
            } else {
                format!("{}[{}].{}", p.object.collection(), p.name, p.field)
            };
            FieldError::new(field, p.message)
        })
        .collect();
    let detail = summarize(&errors);
    if conflict {
        ApiError::Conflict { detail, errors }
    } else {
        ApiError::Invalid { detail, errors }
    }
}

/// Validate the configuration in `tx` and commit it as one new version (see module docs).
pub async fn finish(mut tx: WriteTx<'_>, how: Finish) -> Result<Outcome, ApiError> {
    let (current, current_config) = match tx.current().await? {
        Some((row, cfg)) => (Some(row), cfg),
        None => (None, Arc::new(Config::default())),
    };
    let config = tx.load_config().await?;
    // Chains unchanged since the current version are not parsed again.
    let facts = current.as_ref().and_then(|r| tx.cached_facts(r.version));
    let known = |c: &sluice_shared::Certificate| {
        current_config
            .certificate(c.id)
            .filter(|old| old.cert_pem == c.cert_pem)?;
        facts.as_ref()?.get(&c.id).cloned()
    };
    let validated = validate_with(&config, &known).map_err(|inv| problems_to_error(inv, &how))?;
    let hash = config_hash(&config);
    if let Some(cur) = &current {
        if cur.hash == hash {
            return Ok(Outcome {
                version: cur.version,
                committed: false,
                dry_run: how.dry_run,
                diff: Diff::default(),
            });
        }
    }
    let changes = diff(&current_config, &config);
    let version = current
        .as_ref()
        .map_or(ConfigVersion::FIRST, |c| c.version.next());
    if how.dry_run {
        return Ok(Outcome {
            version,
            committed: false,
            dry_run: true,
            diff: changes,
        });
    }
    let summary = match how.restored_from {
        Some(v) => format!("restored version {v}: {}", changes.summary()),
        None => changes.summary(),
    };
    let row = VersionRow {
        version,
        hash,
        created_at: now_text(),
        summary,
        restored_from: how.restored_from.map(ConfigVersion::get),
    };
    tx.commit_version(&row, Arc::new(config), validated.certificates)
        .await?;
    tracing::info!(version = %version, summary = %row.summary, "committed configuration version");
    Ok(Outcome {
        version,
        committed: true,
        dry_run: false,
        diff: changes,
    })
}

/// On first start, commit version 1: the empty configuration, so workers always have one.
pub async fn ensure_initial_version(db: &Db) -> Result<(), DbError> {
    let mut tx = db.begin_write().await?;
    if tx.current().await?.is_some() {
        return Ok(());
    }
    let config = tx.load_config().await?;
    let row = VersionRow {
        version: ConfigVersion::FIRST,
        hash: config_hash(&config),
        created_at: now_text(),
        summary: "initial configuration".into(),
        restored_from: None,
    };
    let facts = validate(&config)
        .map(|v| v.certificates)
        .unwrap_or_default();
    tx.commit_version(&row, Arc::new(config), facts).await
}

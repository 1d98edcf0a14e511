//! What changed between two configurations, by object, and its one-line summary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::model::{Certificate, Config};

/// One object that was created, updated or deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Change {
    /// `certificate`, `backend` or `host`.
    pub kind: String,
    pub id: Uuid,
    /// Name, or hostname for hosts.
    pub name: String,
}

/// The objects that differ between two configurations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Diff {
    pub created: Vec<Change>,
    pub updated: Vec<Change>,
    pub deleted: Vec<Change>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty()
    }

    pub fn len(&self) -> usize {
        self.created.len() + self.updated.len() + self.deleted.len()
    }

    /// One line for the version history, e.g. `created host redmine.beerme`.
    pub fn summary(&self) -> String {
        const SHOWN: usize = 3;
        let items: Vec<String> = [
            ("created", &self.created),
            ("updated", &self.updated),
            ("deleted", &self.deleted),
        ]
        .into_iter()
        .flat_map(|(verb, list)| {
            list.iter()
                .map(move |c| format!("{verb} {} {}", c.kind, c.name))
        })
        .collect();
        if items.is_empty() {
            return "no changes".into();
        }
        let mut line = items
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if items.len() > SHOWN {
            line.push_str(&format!(" and {} more", items.len() - SHOWN));
        }
        line
    }
}

fn diff_kind<T>(
    kind: &str,
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> (Uuid, String),
    same: impl Fn(&T, &T) -> bool,
    out: &mut Diff,
) {
    let old_by_id: BTreeMap<Uuid, &T> = old.iter().map(|o| (key(o).0, o)).collect();
    let new_by_id: BTreeMap<Uuid, &T> = new.iter().map(|n| (key(n).0, n)).collect();
    let change = |t: &T| {
        let (id, name) = key(t);
        Change {
            kind: kind.to_owned(),
            id,
            name,
        }
    };
    for (id, n) in &new_by_id {
        match old_by_id.get(id) {
            None => out.created.push(change(n)),
            Some(o) if !same(o, n) => out.updated.push(change(n)),
            Some(_) => {}
        }
    }
    for (id, o) in &old_by_id {
        if !new_by_id.contains_key(id) {
            out.deleted.push(change(o));
        }
    }
}

/// Compare two configurations object by object (by id). Private key text is ignored; a changed
/// key shows as a changed `key_sha256`.
pub fn diff(old: &Config, new: &Config) -> Diff {
    let mut out = Diff::default();
    let same_cert = |a: &Certificate, b: &Certificate| {
        a.id == b.id && a.name == b.name && a.cert_pem == b.cert_pem && a.key_sha256 == b.key_sha256
    };
    diff_kind(
        "certificate",
        &old.certificates,
        &new.certificates,
        |c| (c.id, c.name.clone()),
        same_cert,
        &mut out,
    );
    diff_kind(
        "backend",
        &old.backends,
        &new.backends,
        |b| (b.id, b.name.clone()),
        |a, b| a == b,
        &mut out,
    );
    diff_kind(
        "host",
        &old.hosts,
        &new.hosts,
        |h| (h.id, h.hostname.to_string()),
        |a, b| a == b,
        &mut out,
    );
    out
}

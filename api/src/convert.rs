//! Turning client input into model values, shared by the resource routes and the whole-config
//! document: server lists (keeping the ids of servers that stay) and header rules.

use std::collections::HashSet;

use sluice_shared::{Backend, RequestHeaders, Server, ServerAddr};
use uuid::Uuid;

use crate::error::FieldError;

/// A server as a client describes it.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub id: Option<Uuid>,
    pub address: String,
    pub weight: u16,
    pub enabled: bool,
}

/// Build a backend's servers. A server without an id keeps the id of the stored server with the
/// same address (its health state follows the id); every bad address is reported under
/// `{prefix}servers[i].address`.
pub fn servers(
    specs: Vec<ServerSpec>,
    old: Option<&Backend>,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<Server> {
    let mut out = Vec::with_capacity(specs.len());
    let mut used = HashSet::new();
    for (i, s) in specs.into_iter().enumerate() {
        match s.address.parse::<ServerAddr>() {
            Ok(address) => {
                let kept = old
                    .and_then(|o| {
                        o.servers
                            .iter()
                            .find(|x| x.address == address && !used.contains(&x.id))
                    })
                    .map(|x| x.id);
                let id = s.id.or(kept).unwrap_or_else(Uuid::new_v4);
                used.insert(id);
                out.push(Server {
                    id,
                    address,
                    weight: s.weight,
                    enabled: s.enabled,
                });
            }
            Err(e) => errors.push(FieldError::new(
                format!("{prefix}servers[{i}].address"),
                format!("`{}` {e}", s.address),
            )),
        }
    }
    out
}

/// Header rules with their names in lower case (header names are case-insensitive).
pub fn lower_rules(rules: RequestHeaders) -> RequestHeaders {
    RequestHeaders {
        set: rules
            .set
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect(),
        remove: rules
            .remove
            .into_iter()
            .map(|n| n.to_ascii_lowercase())
            .collect(),
    }
}

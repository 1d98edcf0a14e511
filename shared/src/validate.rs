//! The one validation both sides run: the API before it commits a version, the worker before it
//! switches to one. It checks everything that can be known from the [`Config`] alone (names,
//! references, mode/protocol pairs, certificate coverage, ranges); it does not load keys into a
//! TLS stack (the worker does that while building its runtime state) and does not look at the
//! clock, so a certificate that expires while in service never blocks an unrelated change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use uuid::Uuid;

use crate::certs::{self, CertFacts, Coverage};
use crate::model::{Backend, Config, HealthCheckKind, Host, Mode, Protocol, ProxyProtocol};

/// The kind of object a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Certificate,
    Backend,
    Host,
}

impl ObjectKind {
    /// Plural collection name, as in REST paths and config documents.
    pub fn collection(self) -> &'static str {
        match self {
            ObjectKind::Certificate => "certificates",
            ObjectKind::Backend => "backends",
            ObjectKind::Host => "hosts",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            ObjectKind::Certificate => "certificate",
            ObjectKind::Backend => "backend",
            ObjectKind::Host => "host",
        }
    }
}

/// Whether a problem is a clash with other objects (HTTP 409) or a bad value (HTTP 422).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    Invalid,
    Conflict,
}

/// One thing wrong with a configuration, pinned to an object and a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub object: ObjectKind,
    pub id: Uuid,
    /// The object's name or hostname, for messages about other objects.
    pub name: String,
    /// Field path inside the object, e.g. `servers[1].weight`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} `{}`: {}: {}",
            self.object.singular(),
            self.name,
            self.field,
            self.message
        )
    }
}

/// Every problem found in a configuration (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration is invalid: {}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
pub struct Invalid(pub Vec<Problem>);

/// What validation learned on the way, so callers need not parse again.
#[derive(Debug, Clone, Default)]
pub struct Validated {
    /// Facts of every certificate, by id.
    pub certificates: HashMap<Uuid, CertFacts>,
    /// The certificate each terminate host uses (named or chosen), by host id.
    pub host_certificates: HashMap<Uuid, Uuid>,
}

/// Longest name a certificate or backend may have.
pub const MAX_NAME_LEN: usize = 128;
/// Highest server weight (as HAProxy).
pub const MAX_WEIGHT: u16 = 256;
/// Shortest and longest health-check interval, in milliseconds.
pub const INTERVAL_MS: (u32, u32) = (100, 3_600_000);
/// Longest header value a rule may set.
pub const MAX_HEADER_VALUE: usize = 8192;
/// Headers that rules may neither set nor remove: they belong to the connection or framing.
pub const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn push(&mut self, kind: ProblemKind, o: (ObjectKind, Uuid, &str), field: &str, msg: String) {
        self.problems.push(Problem {
            kind,
            object: o.0,
            id: o.1,
            name: o.2.to_owned(),
            field: field.to_owned(),
            message: msg,
        });
    }

    fn invalid(&mut self, o: (ObjectKind, Uuid, &str), field: &str, msg: String) {
        self.push(ProblemKind::Invalid, o, field, msg);
    }

    fn name(&mut self, o: (ObjectKind, Uuid, &str), name: &str) {
        if name.trim().is_empty() {
            self.invalid(o, "name", "must not be empty".into());
        } else if name.len() > MAX_NAME_LEN {
            self.invalid(
                o,
                "name",
                format!("is longer than {MAX_NAME_LEN} characters"),
            );
        } else if name.chars().any(char::is_control) || name.trim() != name {
            self.invalid(
                o,
                "name",
                "must not hold control characters or surrounding spaces".into(),
            );
        }
    }

    fn unique<'a>(&mut self, kind: ObjectKind, items: impl Iterator<Item = (Uuid, &'a str)>) {
        let mut seen: HashMap<&str, Uuid> = HashMap::new();
        let mut ids = HashSet::new();
        let field = if kind == ObjectKind::Host {
            "hostname"
        } else {
            "name"
        };
        for (id, name) in items {
            if !ids.insert(id) {
                self.push(
                    ProblemKind::Conflict,
                    (kind, id, name),
                    "id",
                    "is used twice".into(),
                );
            }
            if let Some(other) = seen.insert(name, id) {
                self.push(
                    ProblemKind::Conflict,
                    (kind, id, name),
                    field,
                    format!("`{name}` is already used by {} {other}", kind.singular()),
                );
            }
        }
    }
}

/// Parse an `expect_status` value: `200`, `200-399`, or a comma list of those (100-599).
pub fn parse_status_ranges(s: &str) -> Result<Vec<(u16, u16)>, String> {
    let code = |t: &str| -> Result<u16, String> {
        t.trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| format!("`{}` is not an HTTP status from 100 to 599", t.trim()))
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        let range = match part.split_once('-') {
            Some((lo, hi)) => (code(lo)?, code(hi)?),
            None => {
                let c = code(part)?;
                (c, c)
            }
        };
        if range.0 > range.1 {
            return Err(format!("range `{}` is backwards", part.trim()));
        }
        out.push(range);
    }
    Ok(out)
}

/// Is `name` a valid lower-case HTTP header name (an RFC 9110 token)?
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

fn check_backend(c: &mut Checker, b: &Backend) {
    let o = (ObjectKind::Backend, b.id, b.name.as_str());
    c.name(o, &b.name);
    let mut server_ids = HashSet::new();
    for (i, s) in b.servers.iter().enumerate() {
        if !server_ids.insert(s.id) {
            c.invalid(
                o,
                &format!("servers[{i}].id"),
                "is used twice in this backend".into(),
            );
        }
        if s.weight == 0 || s.weight > MAX_WEIGHT {
            c.invalid(
                o,
                &format!("servers[{i}].weight"),
                format!("must be 1 to {MAX_WEIGHT}"),
            );
        }
    }
    let hc = &b.health_check;
    if hc.interval_ms < INTERVAL_MS.0 || hc.interval_ms > INTERVAL_MS.1 {
        let (lo, hi) = INTERVAL_MS;
        c.invalid(
            o,
            "health_check.interval_ms",
            format!("must be {lo} to {hi}"),
        );
    }
    if hc.timeout_ms == 0 || hc.timeout_ms >= hc.interval_ms {
        c.invalid(
            o,
            "health_check.timeout_ms",
            format!(
                "must be at least 1 and below interval_ms ({})",
                hc.interval_ms
            ),
        );
    }
    for (field, v) in [("rise", hc.rise), ("fall", hc.fall)] {
        if !(1..=10).contains(&v) {
            c.invalid(
                o,
                &format!("health_check.{field}"),
                "must be 1 to 10".into(),
            );
        }
    }
    if !hc.path.starts_with('/') || hc.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        c.invalid(
            o,
            "health_check.path",
            "must start with `/` and hold no spaces".into(),
        );
    }
    if let Err(e) = parse_status_ranges(&hc.expect_status) {
        c.invalid(o, "health_check.expect_status", e);
    }
    match (hc.kind, b.protocol) {
        (HealthCheckKind::Http, Protocol::Tcp) => c.invalid(
            o,
            "health_check.kind",
            "`http` checks need an http, h2c or https backend".into(),
        ),
        (HealthCheckKind::Tls, Protocol::Http | Protocol::H2c) => c.invalid(
            o,
            "health_check.kind",
            "`tls` checks need an https or tcp backend".into(),
        ),
        _ => {}
    }
    match (&b.tls, b.protocol) {
        (Some(_), p) if p != Protocol::Https => c.invalid(
            o,
            "tls",
            format!(
                "only `https` backends take tls settings, not `{}`",
                p.as_str()
            ),
        ),
        (Some(tls), _) => {
            if let Some(ca) = &tls.ca_pem {
                if let Err(e) = certs::parse_chain(ca) {
                    c.invalid(o, "tls.ca_pem", e.to_string());
                }
            }
        }
        _ => {}
    }
}

fn check_host(
    c: &mut Checker,
    h: &Host,
    backends: &HashMap<Uuid, &Backend>,
    cert_facts: &BTreeMap<Uuid, (&str, CertFacts)>,
    out: &mut Validated,
) {
    let o = (ObjectKind::Host, h.id, h.hostname.as_str());
    let Some(backend) = backends.get(&h.backend_id) else {
        c.invalid(
            o,
            "backend_id",
            format!("no backend has id {}", h.backend_id),
        );
        return;
    };
    match h.mode {
        Mode::Terminate => {
            if !backend.protocol.speaks_http() {
                c.invalid(
                    o,
                    "backend_id",
                    format!(
                        "backend `{}` has protocol `tcp`; terminate hosts need an http, h2c or https backend",
                        backend.name
                    ),
                );
            }
            if h.proxy_protocol != ProxyProtocol::None {
                c.invalid(o, "proxy_protocol", "is only for passthrough hosts".into());
            }
            check_header_rules(c, o, h);
            match h.certificate_id {
                Some(id) => match cert_facts.get(&id) {
                    None => c.invalid(o, "certificate_id", format!("no certificate has id {id}")),
                    Some((name, facts)) => {
                        if certs::coverage(&facts.sans, &h.hostname) == Coverage::None {
                            c.invalid(
                                o,
                                "certificate_id",
                                format!(
                                    "certificate `{name}` does not cover `{}`; its SANs are: {}",
                                    h.hostname,
                                    sans_text(&facts.sans)
                                ),
                            );
                        } else {
                            out.host_certificates.insert(h.id, id);
                        }
                    }
                },
                None => {
                    let best = certs::best_certificate(
                        &h.hostname,
                        cert_facts.iter().map(|(id, (_, f))| (*id, f)),
                    );
                    match best {
                        Some(id) => {
                            out.host_certificates.insert(h.id, id);
                        }
                        None => c.invalid(
                            o,
                            "certificate_id",
                            format!(
                                "no certificate covers `{}`; add one whose SANs include it",
                                h.hostname
                            ),
                        ),
                    }
                }
            }
        }
        Mode::Passthrough => {
            if backend.protocol != Protocol::Tcp {
                c.invalid(
                    o,
                    "backend_id",
                    format!(
                        "backend `{}` has protocol `{}`; passthrough hosts need a `tcp` backend",
                        backend.name,
                        backend.protocol.as_str()
                    ),
                );
            }
            if h.certificate_id.is_some() {
                c.invalid(
                    o,
                    "certificate_id",
                    "passthrough hosts take no certificate".into(),
                );
            }
            if !h.request_headers.is_empty() {
                c.invalid(
                    o,
                    "request_headers",
                    "passthrough hosts do not see HTTP headers".into(),
                );
            }
        }
    }
}

fn sans_text(sans: &[String]) -> String {
    if sans.is_empty() {
        "(none)".into()
    } else {
        sans.join(", ")
    }
}

fn check_header_rules(c: &mut Checker, o: (ObjectKind, Uuid, &str), h: &Host) {
    let names = h
        .request_headers
        .set
        .keys()
        .map(|n| ("set", n))
        .chain(h.request_headers.remove.iter().map(|n| ("remove", n)));
    for (list, name) in names {
        let field = format!("request_headers.{list}.{name}");
        if !is_header_name(name) {
            c.invalid(o, &field, "is not a valid lower-case header name".into());
        } else if RESERVED_HEADERS.contains(&name.as_str()) {
            c.invalid(
                o,
                &field,
                "belongs to the connection and cannot be changed by a rule".into(),
            );
        }
    }
    for (name, value) in &h.request_headers.set {
        if value.len() > MAX_HEADER_VALUE {
            c.invalid(
                o,
                &format!("request_headers.set.{name}"),
                format!("value is longer than {MAX_HEADER_VALUE} bytes"),
            );
        } else if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            c.invalid(
                o,
                &format!("request_headers.set.{name}"),
                "value must not hold control characters".into(),
            );
        }
    }
}

/// Validate a whole configuration. On success, returns what was learned on the way.
pub fn validate(config: &Config) -> Result<Validated, Invalid> {
    validate_with(config, &|_| None)
}

/// As [`validate`], with the facts of certificates already inspected (`known` returns them for
/// a certificate whose chain is unchanged), so a switch does not parse every chain again.
pub fn validate_with(
    config: &Config,
    known: &dyn Fn(&crate::model::Certificate) -> Option<CertFacts>,
) -> Result<Validated, Invalid> {
    let mut c = Checker {
        problems: Vec::new(),
    };
    let mut out = Validated::default();

    c.unique(
        ObjectKind::Certificate,
        config.certificates.iter().map(|x| (x.id, x.name.as_str())),
    );
    c.unique(
        ObjectKind::Backend,
        config.backends.iter().map(|x| (x.id, x.name.as_str())),
    );
    c.unique(
        ObjectKind::Host,
        config.hosts.iter().map(|x| (x.id, x.hostname.as_str())),
    );

    let mut cert_facts = BTreeMap::new();
    for cert in &config.certificates {
        let o = (ObjectKind::Certificate, cert.id, cert.name.as_str());
        c.name(o, &cert.name);
        match known(cert).map_or_else(|| certs::inspect_chain(&cert.cert_pem), Ok) {
            Ok(facts) => {
                cert_facts.insert(cert.id, (cert.name.as_str(), facts));
            }
            Err(e) => c.invalid(o, "cert_pem", e.to_string()),
        }
        if let Some(key) = &cert.key_pem {
            if certs::sha256_hex(key.as_bytes()) != cert.key_sha256 {
                c.invalid(o, "key_pem", "does not match key_sha256".into());
            }
        }
    }

    let backends: HashMap<Uuid, &Backend> = config.backends.iter().map(|b| (b.id, b)).collect();
    for b in &config.backends {
        check_backend(&mut c, b);
    }
    for h in &config.hosts {
        check_host(&mut c, h, &backends, &cert_facts, &mut out);
    }

    if c.problems.is_empty() {
        out.certificates = cert_facts.into_iter().map(|(id, (_, f))| (id, f)).collect();
        Ok(out)
    } else {
        Err(Invalid(c.problems))
    }
}

#[cfg(test)]
mod tests;

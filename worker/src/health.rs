//! Active health checks and each server's state as this worker sees it, HAProxy style: a
//! server goes down after `fall` consecutive failures and comes back after `rise` successes;
//! a new server starts unknown and is used until proven down. Failed connects on real traffic
//! count as failures too (passive detection); a server marked down comes back only through
//! active checks.
//!
//! State is kept by server id in the worker, not in a snapshot, so it survives switches; the
//! checkers are restarted for each snapshot with its settings. A server whose state is in
//! question (unknown, or partway to the other state) is checked four times as often, so a
//! verdict comes quickly; every interval carries a little jitter so checks do not fire together.
//!
//! Kinds: `tcp` connects; `http` sends `GET path` the way traffic goes (HTTP/1.1, over TLS for
//! `https` backends, HTTP/2 with prior knowledge for `h2c`); `tls` completes a handshake with
//! the host's name as SNI and keeps what the certificate says — a certificate that does not
//! cover the name or has expired leaves the server up but carries a warning.

use foldhash::{HashMap, HashMapExt};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use serde::Serialize;
use sluice_shared::channel::CheckedCertificate;
use sluice_shared::validate::parse_status_ranges;
use sluice_shared::{Backend, BackendTls, HealthCheck, HealthCheckKind, Protocol, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;
use uuid::Uuid;

/// What a worker thinks of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Unknown,
    Up,
    Down,
}

/// One server's health as this worker sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ServerHealth {
    pub status: Status,
    /// When the status last changed (RFC 3339).
    pub since: String,
    pub last_check: Option<String>,
    pub latency_ms: Option<f64>,
    pub successes: u32,
    pub failures: u32,
    pub last_error: Option<String>,
    /// What the last `tls` check saw.
    pub certificate: Option<CheckedCertificate>,
    pub warning: Option<String>,
}

impl Default for ServerHealth {
    fn default() -> Self {
        ServerHealth {
            status: Status::Unknown,
            since: crate::now_text(),
            last_check: None,
            latency_ms: None,
            successes: 0,
            failures: 0,
            last_error: None,
            certificate: None,
            warning: None,
        }
    }
}

impl ServerHealth {
    /// Record one result with the backend's rise/fall (pure: the state machine).
    pub fn record(&mut self, ok: bool, rise: u8, fall: u8) -> bool {
        let before = self.status;
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            if self.status != Status::Up && self.successes >= u32::from(rise) {
                self.status = Status::Up;
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            if self.status != Status::Down && self.failures >= u32::from(fall) {
                self.status = Status::Down;
            }
        }
        if self.status != before {
            self.since = crate::now_text();
        }
        self.status != before
    }

    /// Whether the state is in question: unknown, or partway to the other state.
    pub fn in_question(&self) -> bool {
        match self.status {
            Status::Unknown => true,
            Status::Up => self.failures > 0,
            Status::Down => self.successes > 0,
        }
    }
}

/// What a checker knows about the server it checks.
#[derive(Clone)]
pub struct Target {
    pub server: Server,
    pub protocol: Protocol,
    /// A host served by the backend: `Host` for `http` checks, SNI for `tls` checks.
    pub host: Option<String>,
    /// For `https` backends: the client configuration (ALPN http/1.1) and settings.
    pub tls: Option<(Arc<ClientConfig>, BackendTls)>,
}

/// Health of every server this worker knows, by server id.
#[derive(Debug, Default)]
pub struct Health {
    servers: Mutex<HashMap<Uuid, ServerHealth>>,
    /// The backend of each checked server.
    owners: Mutex<HashMap<Uuid, Uuid>>,
    checkers: Mutex<Option<JoinSet<()>>>,
    /// Woken when a server changes state (the channel then reports to the API).
    pub changed: tokio::sync::Notify,
}

impl Health {
    /// May new requests go to this server? (Unknown counts as usable.)
    pub fn usable(&self, server: Uuid) -> bool {
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&server)
            .is_none_or(|h| h.status != Status::Down)
    }

    /// Record a result (from a check, or a failed connect on real traffic); returns whether
    /// the server's state is now in question.
    pub fn record(
        &self,
        server: Uuid,
        ok: bool,
        check: &HealthCheck,
        latency: Option<Duration>,
        error: Option<String>,
    ) -> bool {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let h = servers.entry(server).or_default();
        let changed = h.record(ok, check.rise, check.fall);
        h.last_check = Some(crate::now_text());
        h.latency_ms = latency.map(|l| l.as_secs_f64() * 1000.0);
        if !ok {
            h.last_error = error;
        }
        if changed {
            tracing::info!(%server, status = ?h.status, "server health changed");
            self.changed.notify_one();
        }
        h.in_question()
    }

    /// Keep what a `tls` check saw; a new or cleared warning is reported like a state change.
    pub fn certificate(&self, server: Uuid, cert: CheckedCertificate) {
        let warning = certificate_warning(&cert, time::OffsetDateTime::now_utc());
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let h = servers.entry(server).or_default();
        if h.warning != warning {
            if let Some(w) = &warning {
                tracing::warn!(%server, warning = %w, "server certificate");
            }
            self.changed.notify_one();
        }
        h.warning = warning;
        h.certificate = Some(cert);
    }

    /// Every checked server's state, as reported to the API.
    pub fn report(&self) -> Vec<sluice_shared::channel::ServerReport> {
        let owners = self
            .owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let servers = self.snapshot();
        owners
            .into_iter()
            .map(|(server_id, backend_id)| {
                let h = servers.get(&server_id).cloned().unwrap_or_default();
                sluice_shared::channel::ServerReport {
                    backend_id,
                    server_id,
                    status: match h.status {
                        Status::Unknown => "unknown",
                        Status::Up => "up",
                        Status::Down => "down",
                    }
                    .to_owned(),
                    since: h.since,
                    last_check: h.last_check,
                    latency_ms: h.latency_ms,
                    successes: h.successes,
                    failures: h.failures,
                    last_error: h.last_error,
                    upstream: None,
                    certificate: h.certificate,
                    warning: h.warning,
                }
            })
            .collect()
    }

    /// A copy of every server's state.
    pub fn snapshot(&self) -> HashMap<Uuid, ServerHealth> {
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Check these backends from now on (replacing the previous checkers); forget servers no
    /// longer configured.
    /// `host_for` names a host served by a backend; `tls_for` gives an `https` backend's
    /// client configuration.
    pub fn watch(
        self: &Arc<Self>,
        backends: &[Backend],
        host_for: impl Fn(Uuid) -> Option<String>,
        tls_for: impl Fn(Uuid) -> Option<Arc<ClientConfig>>,
    ) {
        let mut set = JoinSet::new();
        let mut live = std::collections::HashSet::new();
        let mut owners = HashMap::new();
        for b in backends {
            let (host, config) = (host_for(b.id), tls_for(b.id));
            let tls = config.map(|c| (c, b.tls.clone().unwrap_or_default()));
            for s in &b.servers {
                live.insert(s.id);
                owners.insert(s.id, b.id);
                let target = Target {
                    server: s.clone(),
                    protocol: b.protocol,
                    host: host.clone(),
                    tls: tls.clone(),
                };
                let (health, check) = (self.clone(), b.health_check.clone());
                set.spawn(async move { run_checks(health, check, target).await });
            }
        }
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| live.contains(id));
        *self.owners.lock().unwrap_or_else(|e| e.into_inner()) = owners;
        // Dropping the previous JoinSet aborts its checkers.
        *self.checkers.lock().unwrap_or_else(|e| e.into_inner()) = Some(set);
    }
}

/// The warning a checked certificate deserves, if any (pure).
pub fn certificate_warning(cert: &CheckedCertificate, now: time::OffsetDateTime) -> Option<String> {
    let expired = time::OffsetDateTime::parse(
        &cert.not_after,
        &time::format_description::well_known::Rfc3339,
    )
    .is_ok_and(|t| t <= now);
    if expired {
        Some(format!("the certificate expired at {}", cert.not_after))
    } else if !cert.covers_name {
        Some(format!(
            "the certificate does not cover {} (it names {})",
            cert.checked_name,
            cert.sans.join(", ")
        ))
    } else {
        None
    }
}

/// Time until the next check: a quarter of the interval (at least 100 ms) while the state is
/// in question, plus up to 10% jitter.
fn next_delay(interval: Duration, in_question: bool) -> Duration {
    let base = if in_question {
        (interval / 4).max(Duration::from_millis(100)).min(interval)
    } else {
        interval
    };
    let jitter = rand::random::<u64>() % (base.as_millis() as u64 / 10 + 1);
    base + Duration::from_millis(jitter)
}

async fn run_checks(health: Arc<Health>, check: HealthCheck, target: Target) {
    let interval = Duration::from_millis(u64::from(check.interval_ms));
    // Jitter the first check so checks of many servers do not fire together.
    let jitter = rand::random::<u64>() % (interval.as_millis() as u64 / 4 + 1);
    tokio::time::sleep(Duration::from_millis(jitter)).await;
    let id = target.server.id;
    loop {
        let start = Instant::now();
        let timeout = Duration::from_millis(u64::from(check.timeout_ms));
        let result = match tokio::time::timeout(timeout, probe(&check, &target)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        let latency = start.elapsed();
        let (ok, error) = match result {
            Ok(cert) => {
                if let Some(cert) = cert {
                    health.certificate(id, cert);
                }
                (true, None)
            }
            Err(e) => (false, Some(e)),
        };
        let in_question = health.record(id, ok, &check, Some(latency), error);
        tokio::time::sleep(next_delay(interval, in_question).saturating_sub(latency)).await;
    }
}

/// One check of one server; a `tls` check returns what the certificate says.
async fn probe(check: &HealthCheck, t: &Target) -> Result<Option<CheckedCertificate>, String> {
    let server = &t.server;
    let stream = crate::upstream::connect_addr(&server.address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let host = t.host.clone().unwrap_or_else(|| server.address.host_str());
    match (check.kind, t.protocol) {
        (HealthCheckKind::Tcp, _) => Ok(None),
        (HealthCheckKind::Http, Protocol::H2c) => {
            http2_check(stream, check, &host).await.map(|()| None)
        }
        (HealthCheckKind::Http, Protocol::Https) => {
            let (tls, _) = handshake(t, stream).await?;
            http1_check(tls, check, &host).await.map(|()| None)
        }
        (HealthCheckKind::Http, _) => http1_check(stream, check, &host).await.map(|()| None),
        (HealthCheckKind::Tls, _) => {
            let (tls, name) = handshake(t, stream).await?;
            let der = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or("the server presented no certificate")?;
            let facts = sluice_shared::certs::inspect_der(der)
                .map_err(|e| format!("the server's certificate: {e}"))?;
            let covers_name = name.parse::<sluice_shared::Hostname>().is_ok_and(|h| {
                sluice_shared::certs::coverage(&facts.sans, &h)
                    != sluice_shared::certs::Coverage::None
            });
            Ok(Some(CheckedCertificate {
                subject: facts.subject,
                issuer: facts.issuer,
                sans: facts.sans,
                not_after: sluice_shared::certs::rfc3339(facts.not_after),
                checked_name: name,
                covers_name,
            }))
        }
    }
}

/// A TLS handshake for a check: an `https` backend's own settings, else (passthrough) any
/// certificate accepted and the host's name as SNI. Returns the stream and the name sent.
async fn handshake(
    t: &Target,
    stream: tokio::net::TcpStream,
) -> Result<
    (
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        String,
    ),
    String,
> {
    let (config, name) = match &t.tls {
        Some((config, settings)) => (
            config.clone(),
            crate::upstream_tls::server_name(settings, &t.server)?,
        ),
        None => {
            let name = t
                .host
                .clone()
                .unwrap_or_else(|| t.server.address.host_str());
            let name = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|e| format!("`{name}` cannot be a TLS server name: {e}"))?;
            (crate::upstream_tls::inspecting_config(), name)
        }
    };
    let sent = match &name {
        rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_owned(),
        other => format!("{other:?}"),
    };
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    Ok((tls, sent))
}

fn status_ok(check: &HealthCheck, status: u16) -> Result<(), String> {
    let ranges = parse_status_ranges(&check.expect_status).unwrap_or_else(|_| vec![(200, 399)]);
    if ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status)) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

/// `GET path` over HTTP/1.1; the status line decides.
async fn http1_check<S>(mut stream: S, check: &HealthCheck, host: &str) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sluice-health\r\nConnection: close\r\n\r\n",
        check.path
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = [0u8; 64];
    let n = stream
        .read(&mut head)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP answer: {:?}",
                line.lines().next().unwrap_or("")
            )
        })?;
    status_ok(check, status)
}

/// `GET path` over HTTP/2 with prior knowledge (`h2c` backends).
async fn http2_check(
    stream: tokio::net::TcpStream,
    check: &HealthCheck,
    host: &str,
) -> Result<(), String> {
    let (send, connection) = h2::client::handshake(stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = async {
        let mut send = send.ready().await.map_err(|e| format!("HTTP/2: {e}"))?;
        let req = http::Request::get(format!("http://{host}{}", check.path))
            .header(http::header::USER_AGENT, "sluice-health")
            .body(())
            .map_err(|e| format!("request: {e}"))?;
        let (response, _) = send
            .send_request(req, true)
            .map_err(|e| format!("HTTP/2: {e}"))?;
        let response = response.await.map_err(|e| format!("HTTP/2: {e}"))?;
        status_ok(check, response.status().as_u16())
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_like_haproxy() {
        let mut h = ServerHealth::default();
        assert_eq!(h.status, Status::Unknown);
        assert!(!h.record(false, 2, 3));
        assert!(!h.record(false, 2, 3));
        assert!(h.record(false, 2, 3), "down after fall=3 failures");
        assert_eq!(h.status, Status::Down);
        assert!(!h.record(true, 2, 3));
        assert!(h.record(true, 2, 3), "up after rise=2 successes");
        assert_eq!(h.status, Status::Up);
        assert!(!h.record(false, 2, 3), "one failure does not take it down");
        assert!(h.in_question(), "up with a failure is in question");
        assert!(!h.record(true, 2, 3));
        assert!(!h.in_question());
    }

    #[test]
    fn checked_certificates_warn_when_they_do_not_fit() {
        let now = time::macros::datetime!(2026-11-27 12:00 UTC);
        let cert = |not_after: &str, covers_name| CheckedCertificate {
            subject: "CN=odoo.beerme".into(),
            issuer: "CN=CA".into(),
            sans: vec!["odoo.beerme".into()],
            not_after: not_after.into(),
            checked_name: "odoo.beerme".into(),
            covers_name,
        };
        assert_eq!(
            certificate_warning(&cert("2027-01-01T00:00:00Z", true), now),
            None
        );
        let w = certificate_warning(&cert("2027-01-01T00:00:00Z", false), now).unwrap();
        assert!(w.contains("does not cover odoo.beerme"), "{w}");
        let w = certificate_warning(&cert("2026-01-01T00:00:00Z", true), now).unwrap();
        assert!(w.contains("expired"), "{w}");
    }

    #[test]
    fn checks_come_faster_while_the_state_is_in_question() {
        let interval = Duration::from_millis(2000);
        for _ in 0..100 {
            let calm = next_delay(interval, false);
            assert!(calm >= interval && calm <= interval + interval / 10);
            let quick = next_delay(interval, true);
            assert!(quick >= interval / 4 && quick <= interval / 4 + interval / 40);
        }
    }
}

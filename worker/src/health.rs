//! Active health checks and each server's state as this worker sees it, HAProxy style: a
//! server goes down after `fall` consecutive failures and comes back after `rise` successes;
//! a new server starts unknown and is used until proven down. Failed connects on real traffic
//! count as failures too (passive detection); a server marked down comes back only through
//! active checks.
//!
//! State is kept by server id in the worker, not in a snapshot, so it survives switches; the
//! checkers are restarted for each snapshot with its settings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use sluice_shared::validate::parse_status_ranges;
use sluice_shared::{Backend, HealthCheck, HealthCheckKind, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

    /// Record a result (from a check, or a failed connect on real traffic).
    pub fn record(
        &self,
        server: Uuid,
        ok: bool,
        check: &HealthCheck,
        latency: Option<Duration>,
        error: Option<String>,
    ) {
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
    pub fn watch(
        self: &Arc<Self>,
        backends: &[Backend],
        hosts_for: impl Fn(Uuid) -> Option<String>,
    ) {
        let mut set = JoinSet::new();
        let mut live = std::collections::HashSet::new();
        let mut owners = HashMap::new();
        for b in backends {
            for s in &b.servers {
                live.insert(s.id);
                owners.insert(s.id, b.id);
                let (health, check, server, host) = (
                    self.clone(),
                    b.health_check.clone(),
                    s.clone(),
                    hosts_for(b.id),
                );
                set.spawn(async move { run_checks(health, check, server, host).await });
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

async fn run_checks(health: Arc<Health>, check: HealthCheck, server: Server, host: Option<String>) {
    let interval = Duration::from_millis(u64::from(check.interval_ms));
    // Jitter the first check so checks of many servers do not fire together.
    let jitter = rand::random::<u64>() % (interval.as_millis() as u64 / 4 + 1);
    tokio::time::sleep(Duration::from_millis(jitter)).await;
    loop {
        let start = Instant::now();
        let timeout = Duration::from_millis(u64::from(check.timeout_ms));
        let result =
            match tokio::time::timeout(timeout, probe(&check, &server, host.as_deref())).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
        let latency = start.elapsed();
        health.record(
            server.id,
            result.is_ok(),
            &check,
            Some(latency),
            result.err(),
        );
        tokio::time::sleep(interval.saturating_sub(latency)).await;
    }
}

/// One check of one server.
async fn probe(check: &HealthCheck, server: &Server, host: Option<&str>) -> Result<(), String> {
    let mut stream =
        tokio::net::TcpStream::connect((server.address.host_str(), server.address.port()))
            .await
            .map_err(|e| format!("connect: {e}"))?;
    match check.kind {
        HealthCheckKind::Tcp | HealthCheckKind::Tls => Ok(()),
        HealthCheckKind::Http => {
            let host = host.map_or_else(|| server.address.host_str(), str::to_owned);
            let req = format!("GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sluice-health\r\nConnection: close\r\n\r\n", check.path);
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
            let ranges =
                parse_status_ranges(&check.expect_status).unwrap_or_else(|_| vec![(200, 399)]);
            if ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status)) {
                Ok(())
            } else {
                Err(format!("status {status}"))
            }
        }
    }
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
    }
}

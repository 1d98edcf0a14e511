//! The worker's Prometheus metrics.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_shared::ConfigVersion;
use std::sync::{Arc, OnceLock, RwLock};

/// Why a connection was closed before it was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum Closed {
    NotReady,
    NoSni,
    UnknownSni,
    NotTls,
    Malformed,
    HelloTimeout,
    ClientGone,
    Handshake,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    reason: Closed,
}

/// Why a passthrough connection failed: before any byte reached a server (`NoServer`,
/// `Connect`), or while bytes flowed (`IdleTimeout`: nothing either way for the tunnel's idle
/// time; `Io`: a read or write on either side failed, a reset for instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum PassthroughFailure {
    NoServer,
    Connect,
    IdleTimeout,
    Io,
}

/// Which way bytes moved through a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
enum Direction {
    ClientToServer,
    ServerToClient,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    /// The configured host, as in [`RequestLabels`].
    host: SharedStr,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    host: SharedStr,
    direction: Direction,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    host: SharedStr,
    kind: PassthroughFailure,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    server: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The configured host (`*.beerme` for a wildcard), or `-` for a request no host took:
    /// never the client's spelling, so clients cannot grow the label set.
    host: SharedStr,
    status: u16,
}

/// A label value shared by reference count (prometheus-client 0.23 encodes only sized `Arc`s).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct SharedStr(Arc<str>);

impl EncodeLabelValue for SharedStr {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.as_ref(), encoder)
    }
}

/// Counters and gauges of one worker process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    config_version: Gauge,
    applied: Counter,
    deltas: Counter,
    rejected: Counter,
    connected: Gauge,
    closed: Family<ClosedLabels, Counter>,
    passthrough: Family<HostLabels, Counter>,
    passthrough_open: Family<HostLabels, Gauge>,
    passthrough_bytes: Family<BytesLabels, Counter>,
    passthrough_failed: Family<FailureLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    upstream_seconds: Histogram,
    open_connections: Gauge,
    awaiting_request: Gauge,
    h2_connections: Family<ServerLabels, Gauge>,
    h2_streams: Family<ServerLabels, Gauge>,
    h2_requests: Family<ServerLabels, Counter>,
    h2_opened: Family<ServerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice_worker");
        let m = Metrics {
            config_version: Gauge::default(),
            applied: Counter::default(),
            deltas: Counter::default(),
            rejected: Counter::default(),
            connected: Gauge::default(),
            closed: Family::default(),
            passthrough: Family::default(),
            passthrough_open: Family::default(),
            passthrough_bytes: Family::default(),
            passthrough_failed: Family::default(),
            requests: Family::default(),
            upstream_seconds: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            open_connections: Gauge::default(),
            awaiting_request: Gauge::default(),
            h2_connections: Family::default(),
            h2_streams: Family::default(),
            h2_requests: Family::default(),
            h2_opened: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "config_version",
            "Configuration version being served",
            m.config_version.clone(),
        );
        registry.register("snapshots_applied", "Snapshots applied", m.applied.clone());
        registry.register(
            "snapshot_deltas_applied",
            "Snapshots applied from a delta against the previous one",
            m.deltas.clone(),
        );
        registry.register(
            "snapshots_rejected",
            "Snapshots refused by validation",
            m.rejected.clone(),
        );
        registry.register(
            "api_connected",
            "1 while the channel to the API is up",
            m.connected.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections closed before being served, by reason",
            m.closed.clone(),
        );
        registry.register(
            "passthrough_connections",
            "Passthrough connections started, per host",
            m.passthrough.clone(),
        );
        registry.register(
            "passthrough_open_connections",
            "Passthrough connections open, per host",
            m.passthrough_open.clone(),
        );
        registry.register(
            "passthrough_bytes",
            "Bytes passed through, per host and direction (counted as they pass)",
            m.passthrough_bytes.clone(),
        );
        registry.register(
            "passthrough_failures",
            "Passthrough connections that failed, per host and kind",
            m.passthrough_failed.clone(),
        );
        registry.register(
            "http_requests",
            "Terminated requests answered, by host and status",
            m.requests.clone(),
        );
        registry.register(
            "upstream_response_seconds",
            "Time from sending a request upstream to its response headers",
            m.upstream_seconds.clone(),
        );
        registry.register(
            "event_loop_waits",
            "Times a runtime thread, being loaded, waited --coalesce-us before sleeping in epoll",
            crate::coalesce::WAITS.clone(),
        );
        registry.register(
            "open_connections",
            "Client connections open on the HTTPS port",
            m.open_connections.clone(),
        );
        registry.register(
            "connections_awaiting_first_request",
            "Terminated connections past their TLS handshake whose client has sent nothing yet \
             (no HTTP state is held for them)",
            m.awaiting_request.clone(),
        );
        registry.register(
            "upstream_h2_connections",
            "Upstream HTTP/2 connections open, per server",
            m.h2_connections.clone(),
        );
        registry.register(
            "upstream_h2_streams",
            "Upstream HTTP/2 streams in flight, per server",
            m.h2_streams.clone(),
        );
        registry.register(
            "upstream_h2_requests",
            "Requests sent over upstream HTTP/2 connections, per server",
            m.h2_requests.clone(),
        );
        registry.register(
            "upstream_h2_connections_opened",
            "Upstream HTTP/2 connections opened, per server",
            m.h2_opened.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn applied(&self, version: ConfigVersion) {
        self.applied.inc();
        self.config_version.set(version.get() as i64);
    }

    pub fn delta_applied(&self) {
        self.deltas.inc();
    }

    pub fn rejected(&self) {
        self.rejected.inc();
    }

    pub fn closed(&self, reason: Closed) {
        self.closed.get_or_create(&ClosedLabels { reason }).inc();
    }

    /// Count a passthrough connection of `host` as started, and as open until the returned
    /// meters are dropped; its bytes are counted on them as they pass.
    pub fn passthrough_started(&self, host: &HostMetrics) -> TunnelMeters {
        let handles = host.passthrough.get_or_init(|| {
            let labels = HostLabels {
                host: SharedStr(host.label.clone()),
            };
            let bytes = |direction| {
                self.passthrough_bytes
                    .get_or_create(&BytesLabels {
                        host: labels.host.clone(),
                        direction,
                    })
                    .clone()
            };
            PassthroughHandles {
                started: self.passthrough.get_or_create(&labels).clone(),
                client_to_server: bytes(Direction::ClientToServer),
                server_to_client: bytes(Direction::ServerToClient),
                open: self.passthrough_open.get_or_create(&labels).clone(),
            }
        });
        handles.started.inc();
        TunnelMeters {
            client_to_server: handles.client_to_server.clone(),
            server_to_client: handles.server_to_client.clone(),
            _open: Counted::new(&handles.open),
        }
    }

    pub fn passthrough_failed(&self, host: &HostMetrics, kind: PassthroughFailure) {
        self.passthrough_failed
            .get_or_create(&FailureLabels {
                host: SharedStr(host.label.clone()),
                kind,
            })
            .inc();
    }

    /// Count a request of `host` (`None`: no host took it) answered with `status`.
    pub fn request(&self, host: Option<&HostMetrics>, status: u16) {
        static NONE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("-"));
        let Some(host) = host else {
            self.requests
                .get_or_create(&RequestLabels {
                    host: SharedStr(NONE.clone()),
                    status,
                })
                .inc();
            return;
        };
        let seen = host.requests.read().unwrap_or_else(|e| e.into_inner());
        if let Some((_, counter)) = seen.iter().find(|(s, _)| *s == status) {
            counter.inc();
            return;
        }
        drop(seen);
        let counter = self
            .requests
            .get_or_create(&RequestLabels {
                host: SharedStr(host.label.clone()),
                status,
            })
            .clone();
        counter.inc();
        let mut seen = host.requests.write().unwrap_or_else(|e| e.into_inner());
        // Another thread may have added it meanwhile: the same series either way.
        if !seen.iter().any(|(s, _)| *s == status) {
            seen.push((status, counter));
        }
    }

    pub fn upstream_latency(&self, seconds: f64) {
        self.upstream_seconds.observe(seconds);
    }

    /// Count a client connection as open until the guard is dropped.
    pub fn connection_opened(&self) -> Counted {
        Counted::new(&self.open_connections)
    }

    /// Count a terminated connection as waiting for its first request until the guard is
    /// dropped.
    pub fn awaiting_first_request(&self) -> Counted {
        Counted::new(&self.awaiting_request)
    }

    /// Makes the metric handles of one upstream HTTP/2 server (for the HTTP/2 pool).
    pub fn h2_server_metrics(&self) -> crate::h2pool::MetricsFactory {
        let (c, s, r, o) = (
            self.h2_connections.clone(),
            self.h2_streams.clone(),
            self.h2_requests.clone(),
            self.h2_opened.clone(),
        );
        std::sync::Arc::new(move |server: &str| {
            let l = ServerLabels {
                server: server.to_owned(),
            };
            crate::h2pool::ServerMetrics {
                connections: c.get_or_create(&l).clone(),
                streams: s.get_or_create(&l).clone(),
                requests: r.get_or_create(&l).clone(),
                opened: o.get_or_create(&l).clone(),
            }
        })
    }

    pub fn render(&self, connected: bool) -> String {
        self.connected.set(i64::from(connected));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// One unit of a gauge, held until dropped (an open connection, a connection waiting).
#[derive(Debug)]
pub struct Counted(Gauge);

/// A configured host as the metrics know it: its name (the label: one per configured host,
/// never the client's spelling) and its series, looked up in the families on first use and
/// kept with the snapshot, so a connection or a request is counted with atomic adds instead of
/// hashing its labels each time (measured: about 960 instructions per passthrough connection
/// and 370 per request went to those lookups).
#[derive(Debug)]
pub struct HostMetrics {
    label: Arc<str>,
    passthrough: OnceLock<PassthroughHandles>,
    /// Answered requests, by status: the statuses seen so far (at most the 900 valid ones).
    /// Read-locked to count (shared between threads, as the family's own lock was), written
    /// only for a status the host had not answered yet.
    requests: RwLock<Vec<(u16, Counter)>>,
}

impl HostMetrics {
    pub fn new(hostname: &str) -> HostMetrics {
        HostMetrics {
            label: Arc::from(hostname),
            passthrough: OnceLock::new(),
            requests: RwLock::new(Vec::new()),
        }
    }
}

/// A host's passthrough series.
#[derive(Debug)]
struct PassthroughHandles {
    started: Counter,
    client_to_server: Counter,
    server_to_client: Counter,
    open: Gauge,
}

/// The byte counters of one passthrough connection (handles to its host's series); the
/// connection counts as open while these live.
pub struct TunnelMeters {
    pub client_to_server: Counter,
    pub server_to_client: Counter,
    _open: Counted,
}

impl Counted {
    fn new(gauge: &Gauge) -> Counted {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_series_are_shared_by_a_hosts_connections_and_kept_apart_between_hosts() {
        let m = Metrics::default();
        let (a, b) = (HostMetrics::new("a.example"), HostMetrics::new("b.example"));
        let first = m.passthrough_started(&a);
        let second = m.passthrough_started(&a);
        let other = m.passthrough_started(&b);
        first.client_to_server.inc_by(10);
        second.client_to_server.inc_by(5);
        other.server_to_client.inc_by(7);
        drop(second);
        let text = m.render(true);
        for line in [
            r#"sluice_worker_passthrough_connections_total{host="a.example"} 2"#,
            r#"sluice_worker_passthrough_connections_total{host="b.example"} 1"#,
            r#"sluice_worker_passthrough_open_connections{host="a.example"} 1"#,
            r#"sluice_worker_passthrough_open_connections{host="b.example"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        let bytes = |host: &str, direction: &str| {
            text.lines()
                .find(|l| l.contains(host) && l.contains(direction) && l.contains("bytes"))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(bytes("a.example", "ClientToServer").as_deref(), Some("15"));
        assert_eq!(bytes("b.example", "ServerToClient").as_deref(), Some("7"));
        drop((first, other));
        let text = m.render(true);
        assert!(text.contains(r#"sluice_worker_passthrough_open_connections{host="a.example"} 0"#));
    }

    #[test]
    fn requests_are_counted_by_host_and_status_once_each() {
        let m = Metrics::default();
        let (a, b) = (HostMetrics::new("a.example"), HostMetrics::new("b.example"));
        for _ in 0..3 {
            m.request(Some(&a), 200);
        }
        m.request(Some(&a), 404);
        m.request(Some(&b), 200);
        m.request(None, 421);
        // Another snapshot's handle for the same host adds to the same series.
        m.request(Some(&HostMetrics::new("a.example")), 200);
        let text = m.render(true);
        for line in [
            r#"sluice_worker_http_requests_total{host="a.example",status="200"} 4"#,
            r#"sluice_worker_http_requests_total{host="a.example",status="404"} 1"#,
            r#"sluice_worker_http_requests_total{host="b.example",status="200"} 1"#,
            r#"sluice_worker_http_requests_total{host="-",status="421"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn requests_counted_from_many_threads_are_all_counted() {
        let m = Metrics::default();
        let host = HostMetrics::new("a.example");
        std::thread::scope(|s| {
            for t in 0..4u16 {
                let (m, host) = (&m, &host);
                s.spawn(move || {
                    for i in 0..1000u16 {
                        // Each thread meets statuses new to the host while the others count.
                        m.request(Some(host), 200 + (i + t) % 5);
                    }
                });
            }
        });
        let text = m.render(true);
        let total: u64 = text
            .lines()
            .filter(|l| l.starts_with("sluice_worker_http_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(total, 4000, "{text}");
        assert_eq!(host.requests.read().expect("lock").len(), 5);
    }
}

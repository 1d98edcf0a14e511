//! The worker's Prometheus metrics.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sluice_shared::ConfigVersion;

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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    host: String,
    status: u16,
}

/// Counters and gauges of one worker process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    config_version: Gauge,
    applied: Counter,
    rejected: Counter,
    connected: Gauge,
    closed: Family<ClosedLabels, Counter>,
    passthrough: Counter,
    passthrough_failed: Counter,
    requests: Family<RequestLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice_worker");
        let m = Metrics {
            config_version: Gauge::default(),
            applied: Counter::default(),
            rejected: Counter::default(),
            connected: Gauge::default(),
            closed: Family::default(),
            passthrough: Counter::default(),
            passthrough_failed: Counter::default(),
            requests: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "config_version",
            "Configuration version being served",
            m.config_version.clone(),
        );
        registry.register("snapshots_applied", "Snapshots applied", m.applied.clone());
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
            "Passthrough connections started",
            m.passthrough.clone(),
        );
        registry.register(
            "passthrough_failures",
            "Passthrough connections that failed",
            m.passthrough_failed.clone(),
        );
        registry.register(
            "http_requests",
            "Terminated requests answered, by host and status",
            m.requests.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn applied(&self, version: ConfigVersion) {
        self.applied.inc();
        self.config_version.set(version.get() as i64);
    }

    pub fn rejected(&self) {
        self.rejected.inc();
    }

    pub fn closed(&self, reason: Closed) {
        self.closed.get_or_create(&ClosedLabels { reason }).inc();
    }

    pub fn passthrough_started(&self) {
        self.passthrough.inc();
    }

    pub fn passthrough_failed(&self) {
        self.passthrough_failed.inc();
    }

    pub fn request(&self, host: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                host: host.to_owned(),
                status,
            })
            .inc();
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

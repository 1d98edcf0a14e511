//! The worker's Prometheus metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sluice_shared::ConfigVersion;

/// Counters and gauges of one worker process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    config_version: Gauge,
    applied: Counter,
    rejected: Counter,
    connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice_worker");
        let config_version = Gauge::default();
        let applied = Counter::default();
        let rejected = Counter::default();
        let connected = Gauge::default();
        registry.register(
            "config_version",
            "Configuration version being served",
            config_version.clone(),
        );
        registry.register("snapshots_applied", "Snapshots applied", applied.clone());
        registry.register(
            "snapshots_rejected",
            "Snapshots refused by validation",
            rejected.clone(),
        );
        registry.register(
            "api_connected",
            "1 while the channel to the API is up",
            connected.clone(),
        );
        Metrics {
            registry,
            config_version,
            applied,
            rejected,
            connected,
        }
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

    pub fn render(&self, connected: bool) -> String {
        self.connected.set(i64::from(connected));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

//! The live event feed: health transitions as workers report them, versions committed, and
//! each worker applying or rejecting a version, fanned out to every `GET /v1/events` stream.
//!
//! A bounded broadcast channel: a stream that falls behind is told how many events it missed
//! (a `lagged` event) instead of holding memory for it.

use serde::Serialize;
use sluice_shared::ConfigVersion;
use tokio::sync::broadcast;
use utoipa::ToSchema;
use uuid::Uuid;

/// Events buffered for slow streams.
const CAPACITY: usize = 1024;

/// One event. The SSE `event:` field is the `type`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A new configuration version was committed.
    Committed { version: ConfigVersion, at: String },
    /// A worker applied a version.
    Applied {
        worker_id: Uuid,
        worker_name: String,
        version: ConfigVersion,
        at: String,
    },
    /// A worker refused a version (it keeps serving its previous one).
    Rejected {
        worker_id: Uuid,
        worker_name: String,
        version: ConfigVersion,
        error: String,
        at: String,
    },
    /// A worker's verdict on a server changed.
    Health {
        worker_id: Uuid,
        worker_name: String,
        backend_id: Uuid,
        server_id: Uuid,
        from: String,
        to: String,
        last_error: Option<String>,
        at: String,
    },
    /// A worker connected or disconnected.
    Worker {
        worker_id: Uuid,
        worker_name: String,
        connected: bool,
        at: String,
    },
    /// This stream fell behind and missed events.
    Lagged { missed: u64 },
}

impl Event {
    /// The SSE event name.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Committed { .. } => "committed",
            Event::Applied { .. } => "applied",
            Event::Rejected { .. } => "rejected",
            Event::Health { .. } => "health",
            Event::Worker { .. } => "worker",
            Event::Lagged { .. } => "lagged",
        }
    }
}

/// The fan-out.
#[derive(Debug)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Events {
    /// Send to every open stream (none open: dropped).
    pub fn send(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

/// Transitions between two health reports of one worker (pure): every server whose status
/// differs from the previous report, a server new to the report counting as `unknown` before.
pub fn transitions<'a>(
    before: &'a [sluice_shared::channel::ServerReport],
    after: &'a [sluice_shared::channel::ServerReport],
) -> Vec<(&'a sluice_shared::channel::ServerReport, &'a str)> {
    after
        .iter()
        .filter_map(|now| {
            let was = before
                .iter()
                .find(|b| b.server_id == now.server_id)
                .map_or("unknown", |b| b.status.as_str());
            (was != now.status).then_some((now, was))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_shared::channel::ServerReport;

    fn report(server: Uuid, status: &str) -> ServerReport {
        ServerReport {
            backend_id: Uuid::nil(),
            server_id: server,
            status: status.into(),
            since: String::new(),
            last_check: None,
            latency_ms: None,
            successes: 0,
            failures: 0,
            last_error: None,
            upstream: None,
            certificate: None,
            warning: None,
        }
    }

    #[test]
    fn only_changed_servers_are_transitions() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let before = vec![report(a, "up"), report(b, "up")];
        let after = vec![report(a, "up"), report(b, "down"), report(c, "up")];
        let t: Vec<(Uuid, &str, &str)> = transitions(&before, &after)
            .into_iter()
            .map(|(r, was)| (r.server_id, was, r.status.as_str()))
            .collect();
        assert_eq!(t, [(b, "up", "down"), (c, "unknown", "up")]);
        assert!(transitions(&after, &after).is_empty());
    }
}

//! The worker's side of the channel: connect to the API, say Hello, apply pushed snapshots,
//! answer Ack or Nack, keep heartbeats, and reconnect with jittered exponential backoff.
//!
//! Traffic never waits on any of this: applying a snapshot builds the new state off to the side
//! and switches one pointer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use sluice_shared::channel::{
    decode, encode, ApiMessage, Frame, WorkerMessage, CHANNEL_PATH, MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
};
use sluice_shared::Snapshot;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::runtime::{self, Source};
use crate::Worker;

/// Heartbeat interval until the API's Welcome says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// A peer silent for this many intervals is gone.
const MISSED_HEARTBEATS: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a channel session ended.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the API URL `{0}` is not http:// (TLS to the API is not supported yet)")]
    BadUrl(String),
    #[error("connecting timed out")]
    ConnectTimeout,
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("the API closed the channel")]
    Closed,
    #[error("no heartbeat from the API for {0:?}")]
    HeartbeatTimeout(Duration),
    #[error("the API refused this worker: {0}")]
    Refused(String),
    #[error("undecodable message from the API: {0}")]
    Decode(#[from] sluice_shared::channel::DecodeError),
}

/// Jittered exponential backoff: the first delay is 50-100 ms, each later one doubles up to
/// `cap`, and each is drawn from the upper half of its range.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            attempt: 0,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay; `unit` is a random number in [0, 1).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}

/// `http://host:port` -> `ws://host:port/worker/v1/channel`.
pub fn channel_url(api: &str) -> Result<String, ChannelError> {
    let rest = api
        .strip_prefix("http://")
        .ok_or_else(|| ChannelError::BadUrl(api.to_owned()))?;
    Ok(format!("ws://{}{CHANNEL_PATH}", rest.trim_end_matches('/')))
}

/// Keep a channel to the API until `shutdown` turns true.
pub async fn run(worker: Arc<Worker>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Backoff::default();
    loop {
        let result = session(&worker, &mut backoff, &mut shutdown).await;
        if *shutdown.borrow() {
            return;
        }
        worker.connected.store(false, Ordering::Relaxed);
        let delay = match result {
            Ok(()) => backoff.next_delay(rand::thread_rng().gen()),
            Err(ChannelError::Refused(reason)) => {
                tracing::error!(%reason, "the API refused this worker");
                backoff
                    .next_delay(rand::thread_rng().gen())
                    .max(Duration::from_secs(5))
            }
            Err(e) => {
                let delay = backoff.next_delay(rand::thread_rng().gen());
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "channel to the API is down; serving the last applied snapshot");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {},
            _ = shutdown.changed() => return,
        }
    }
}

fn to_message(frame: Frame) -> Message {
    match frame {
        Frame::Text(t) => Message::Text(t.into()),
        Frame::Binary(b) => Message::Binary(b.into()),
    }
}

/// One connection: Hello, then serve messages until it breaks.
async fn session(
    worker: &Arc<Worker>,
    backoff: &mut Backoff,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), ChannelError> {
    let mut request = channel_url(&worker.api)?.into_client_request()?;
    let auth = format!("Bearer {}", worker.token);
    request.headers_mut().insert(
        "authorization",
        auth.parse().map_err(|_| {
            ChannelError::Refused("the worker token is not a valid header value".into())
        })?,
    );
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let (ws, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(request, Some(config), true),
    )
    .await
    .map_err(|_| ChannelError::ConnectTimeout)??;
    let (mut sink, mut stream) = ws.split();
    let applied = worker.current.applied();
    let hello = WorkerMessage::Hello {
        worker_id: worker.id,
        name: worker.name.clone(),
        applied_version: applied.as_ref().map(|a| a.0),
        applied_hash: applied.map(|a| a.1),
        protocol_version: PROTOCOL_VERSION,
        address: Some(
            worker
                .https_bound
                .get()
                .copied()
                .unwrap_or(worker.https_addr)
                .to_string(),
        ),
        admin_address: worker.admin_addr.get().map(|a| a.to_string()),
    };
    sink.send(to_message(encode(&hello, false))).await?;

    let mut heartbeat = DEFAULT_HEARTBEAT;
    // Health goes to the API on every change and every few seconds (so a restarted API
    // rebuilds its view).
    let mut full_report = tokio::time::interval(Duration::from_secs(5));
    let mut tick = tokio::time::interval(heartbeat);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            msg = stream.next() => {
                let frame = match msg {
                    None => return Err(ChannelError::Closed),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Message::Text(t))) => Frame::Text(t.to_string()),
                    Some(Ok(Message::Binary(b))) => Frame::Binary(b.to_vec()),
                    Some(Ok(Message::Close(_))) => return Err(ChannelError::Closed),
                    Some(Ok(_)) => continue,
                };
                last_heard = Instant::now();
                let decoding = std::time::Instant::now();
                let message = decode::<ApiMessage>(&frame)?;
                let decode_ms = decoding.elapsed().as_secs_f64() * 1000.0;
                match message {
                    ApiMessage::Welcome { heartbeat_ms } => {
                        heartbeat = Duration::from_millis(heartbeat_ms.max(10));
                        tick = tokio::time::interval(heartbeat);
                        worker.connected.store(true, Ordering::Relaxed);
                        backoff.reset();
                        tracing::info!(api = %worker.api, "connected to the API");
                    }
                    ApiMessage::Snapshot { version, hash, body } => {
                        tracing::debug!(%version, decode_ms, "snapshot received");
                        let snapshot = Snapshot { version, hash, config: body };
                        let reply = apply(worker, snapshot, Received::Full(frame)).await;
                        sink.send(to_message(encode(&reply, false))).await?;
                    }
                    ApiMessage::Delta { base, base_hash, version, hash, body } => {
                        tracing::debug!(%base, %version, changes = body.len(), decode_ms, "delta received");
                        let reply = match worker.current.load().filter(|rt| rt.version == base && rt.hash == base_hash) {
                            // Not on the delta's base (restarted from an older state): ask for all.
                            None => WorkerMessage::Resync { version },
                            Some(rt) => {
                                let applied = tokio::task::spawn_blocking(move || {
                                    sluice_shared::delta::apply(&rt.config_with_keys(), &body)
                                })
                                .await;
                                match applied {
                                    Ok(config) => {
                                        let snapshot = Snapshot { version, hash, config };
                                        apply(worker, snapshot, Received::Delta(frame)).await
                                    }
                                    Err(_) => WorkerMessage::Resync { version },
                                }
                            }
                        };
                        sink.send(to_message(encode(&reply, false))).await?;
                    }
                    ApiMessage::Heartbeat => {}
                    ApiMessage::Refused { reason } => return Err(ChannelError::Refused(reason)),
                }
            }
            _ = worker.health.changed.notified() => {
                let report = WorkerMessage::HealthReport { servers: worker.server_reports() };
                sink.send(to_message(encode(&report, false))).await?;
            }
            _ = full_report.tick() => {
                let report = WorkerMessage::HealthReport { servers: worker.server_reports() };
                sink.send(to_message(encode(&report, false))).await?;
            }
            _ = shutdown.changed() => {
                // Say goodbye properly so the API logs a close, not a reset.
                let _ = sink.send(Message::Close(None)).await;
                return Ok(());
            }
            _ = tick.tick() => {
                let silent = last_heard.elapsed();
                if silent > heartbeat * MISSED_HEARTBEATS {
                    return Err(ChannelError::HeartbeatTimeout(silent));
                }
                sink.send(to_message(encode(&WorkerMessage::Heartbeat, false))).await?;
            }
        }
    }
}

/// How a snapshot arrived, with the frame to persist.
enum Received {
    Full(Frame),
    Delta(Frame),
}

/// Build, switch, persist; the answer for the API. A delta whose result does not have the
/// claimed hash asks for the whole snapshot instead of refusing the version.
async fn apply(worker: &Arc<Worker>, snapshot: Snapshot, received: Received) -> WorkerMessage {
    let version = snapshot.version;
    if worker
        .current
        .applied()
        .is_some_and(|(v, h)| v == version && h == snapshot.hash)
    {
        // Already serving exactly this: nothing to rebuild.
        return WorkerMessage::Ack {
            version,
            hash: snapshot.hash,
        };
    }
    let started = std::time::Instant::now();
    let now = crate::now_text();
    let previous = worker.current.load();
    let before = previous.clone();
    let built = tokio::task::spawn_blocking(move || {
        runtime::build(snapshot, Source::Api, now, previous.as_deref())
    })
    .await;
    let build_ms = started.elapsed().as_secs_f64() * 1000.0;
    match built {
        Ok(Ok(rt)) => {
            let hash = rt.hash.clone();
            let rt = Arc::new(rt);
            worker.switch(rt.clone());
            worker.metrics.applied(version);
            let delta = matches!(received, Received::Delta(_));
            tracing::info!(%version, delta, build_ms, total_ms = started.elapsed().as_secs_f64() * 1000.0, "applied snapshot");
            worker.persist(match received {
                Received::Full(frame) => crate::Persist::Full(version, frame),
                Received::Delta(frame) => {
                    worker.metrics.delta_applied();
                    let forgets_a_key = before.as_deref().is_some_and(|b| rt.drops_a_key_of(b));
                    crate::Persist::Delta {
                        version,
                        frame,
                        runtime: rt,
                        forgets_a_key,
                    }
                }
            });
            WorkerMessage::Ack { version, hash }
        }
        Ok(Err(runtime::BuildError::HashMismatch { claimed, actual }))
            if matches!(received, Received::Delta(_)) =>
        {
            tracing::warn!(%version, %claimed, %actual, "a delta did not produce the claimed content; asking for the whole snapshot");
            WorkerMessage::Resync { version }
        }
        Ok(Err(e)) => {
            worker.metrics.rejected();
            tracing::warn!(%version, error = %e, "rejected snapshot; still serving the previous one");
            WorkerMessage::Nack {
                version,
                error: e.to_string(),
            }
        }
        Err(join) => {
            worker.metrics.rejected();
            WorkerMessage::Nack {
                version,
                error: format!("building the snapshot failed: {join}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_under_100ms_doubles_and_caps_at_10s() {
        let mut b = Backoff::default();
        let first = b.next_delay(0.99);
        assert!(
            first <= Duration::from_millis(100) && first >= Duration::from_millis(50),
            "{first:?}"
        );
        assert_eq!(b.next_delay(1.0), Duration::from_millis(200));
        for _ in 0..20 {
            assert!(b.next_delay(1.0) <= Duration::from_secs(10));
        }
        assert_eq!(b.next_delay(0.0), Duration::from_secs(5));
        b.reset();
        assert!(b.next_delay(0.0) == Duration::from_millis(50));
    }

    #[test]
    fn channel_urls() {
        assert_eq!(
            channel_url("http://127.0.0.1:9000/").unwrap(),
            "ws://127.0.0.1:9000/worker/v1/channel"
        );
        assert!(channel_url("https://api").is_err());
    }
}

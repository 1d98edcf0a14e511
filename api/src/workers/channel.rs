//! The API's side of the worker channel: one WebSocket per worker at
//! `/worker/v1/channel`, authenticated with the worker token.
//!
//! A session answers Hello with Welcome, sends the newest snapshot whenever the worker is not on
//! it (at once on connect, and the moment a new version is committed: no polling), records Acks
//! and Nacks, never resends a version the worker rejected, and keeps heartbeats both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::{SinkExt, StreamExt};
use sluice_shared::channel::{
    decode, encode_api, ApiMessage, Frame, WorkerMessage, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};
use sluice_shared::ConfigVersion;
use tokio::time::Instant;
use uuid::Uuid;

use crate::db::{now_text, HelloRecord};
use crate::error::ApiError;
use crate::events::Event;
use crate::AppState;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /worker/v1/channel`: check the worker token, then upgrade to a WebSocket.
pub async fn handler(
    State(app): State<AppState>,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let peer = peer.map(|Extension(ConnectInfo(a))| a);
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !token.is_some_and(|t| app.worker_token.matches(t)) {
        tracing::warn!(peer = ?peer, "worker channel refused: missing or wrong worker token");
        return ApiError::Unauthorized.into_response();
    }
    match ws {
        Ok(ws) => ws
            .max_message_size(MAX_MESSAGE_BYTES)
            .max_frame_size(MAX_MESSAGE_BYTES)
            .on_upgrade(move |socket| async move {
                if let Err(e) = session(app, socket, peer).await {
                    tracing::warn!(peer = ?peer, error = %e, "worker channel ended");
                }
            }),
        Err(_) => ApiError::bad_request("", "this endpoint speaks WebSocket only").into_response(),
    }
}

fn to_message(frame: &Frame) -> Message {
    match frame {
        Frame::Text(t) => Message::Text(t.clone().into()),
        Frame::Binary(b) => Message::Binary(b.clone().into()),
    }
}

fn from_message(msg: Message) -> Option<Frame> {
    match msg {
        Message::Text(t) => Some(Frame::Text(t.to_string())),
        Message::Binary(b) => Some(Frame::Binary(b.to_vec())),
        _ => None,
    }
}

/// Where a worker stands, as far as this session knows.
#[derive(Debug, Default)]
struct Position {
    applied: Option<(ConfigVersion, String)>,
    /// Sent and not yet answered.
    in_flight: Option<ConfigVersion>,
    /// Refused by the worker: never sent again.
    rejected: Option<ConfigVersion>,
    /// The worker asked for a whole snapshot (a delta did not fit what it has).
    resync: bool,
}

async fn session(app: AppState, socket: WebSocket, peer: Option<SocketAddr>) -> anyhow::Result<()> {
    let (mut sink, mut stream) = socket.split();
    // Hello first.
    let first = tokio::time::timeout(HELLO_TIMEOUT, stream.next())
        .await
        .map_err(|_| anyhow::anyhow!("no Hello within {HELLO_TIMEOUT:?}"))?;
    let Some(Ok(first)) = first else {
        anyhow::bail!("closed before Hello")
    };
    let Some(frame) = from_message(first) else {
        anyhow::bail!("first message is not Hello")
    };
    let WorkerMessage::Hello {
        worker_id,
        name,
        applied_version,
        applied_hash,
        protocol_version,
        address,
        admin_address,
    } = decode(&frame)?
    else {
        anyhow::bail!("first message is not Hello");
    };
    if protocol_version != PROTOCOL_VERSION {
        let reason = format!("protocol version {protocol_version} is not supported; this API speaks {PROTOCOL_VERSION}");
        sink.send(to_message(&encode_api(&ApiMessage::Refused {
            reason: reason.clone(),
        })))
        .await?;
        anyhow::bail!(reason);
    }
    let managed = app.workers.is_managed(worker_id);
    let previous = app.db.get_worker(worker_id).await?;
    app.db
        .worker_hello(
            &HelloRecord {
                id: worker_id,
                name: &name,
                managed,
                address: address.as_deref(),
                admin_address: admin_address.as_deref(),
                applied_version: applied_version.map(ConfigVersion::get),
                applied_hash: applied_hash.as_deref(),
            },
            &now_text(),
        )
        .await?;
    let reg = app.workers.register(worker_id);
    tracing::info!(%worker_id, %name, peer = ?peer, managed, applied = ?applied_version, "worker connected");
    let connected = |connected| Event::Worker {
        worker_id,
        worker_name: name.clone(),
        connected,
        at: now_text(),
    };
    app.workers.events.send(connected(true));
    let result = serve(
        &app,
        &mut sink,
        &mut stream,
        (worker_id, &name),
        &reg.kick,
        Position {
            applied: applied_version.zip(applied_hash.clone()),
            in_flight: None,
            rejected: previous
                .and_then(|p| p.last_error_version)
                .and_then(|v| ConfigVersion::try_from(v).ok()),
            resync: false,
        },
    )
    .await;
    app.workers.unregister(worker_id, reg.generation);
    app.workers.events.send(connected(false));
    let _ = app.db.worker_seen(worker_id, &now_text()).await;
    tracing::info!(%worker_id, %name, "worker disconnected");
    result
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;
type Stream = futures_util::stream::SplitStream<WebSocket>;

/// Send the newest snapshot if the worker is not on it and has not refused it.
async fn push_if_behind(app: &AppState, sink: &mut Sink, pos: &mut Position) -> anyhow::Result<()> {
    let Some(newest) = *app.db.subscribe().borrow() else {
        return Ok(());
    };
    if pos.in_flight == Some(newest) || pos.rejected == Some(newest) {
        return Ok(());
    }
    if let Some((v, hash)) = &pos.applied {
        // Up to date when version and content agree.
        if *v == newest
            && app
                .db
                .version_row(newest)
                .await?
                .is_some_and(|row| row.hash == *hash)
        {
            return Ok(());
        }
        // Behind: the change from what it has, when the API still knows that version.
        if *v < newest && !pos.resync {
            if let Some(frame) = app.workers.delta_frame(&app.db, *v, hash, newest).await? {
                sink.send(to_message(&frame)).await?;
                pos.in_flight = Some(newest);
                return Ok(());
            }
        }
    }
    let Some(frame) = app.workers.snapshot_frame(&app.db, newest).await? else {
        return Ok(());
    };
    sink.send(to_message(&frame)).await?;
    pos.in_flight = Some(newest);
    pos.resync = false;
    Ok(())
}

async fn serve(
    app: &AppState,
    sink: &mut Sink,
    stream: &mut Stream,
    (worker_id, name): (Uuid, &str),
    kick: &Arc<tokio::sync::Notify>,
    mut pos: Position,
) -> anyhow::Result<()> {
    let heartbeat = app.workers.heartbeat;
    sink.send(to_message(&encode_api(&ApiMessage::Welcome {
        heartbeat_ms: heartbeat.as_millis() as u64,
    })))
    .await?;
    let mut versions = app.db.subscribe();
    versions.mark_changed();
    let mut tick = tokio::time::interval(heartbeat);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            changed = versions.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                versions.borrow_and_update();
                push_if_behind(app, sink, &mut pos).await?;
            }
            msg = stream.next() => {
                let frame = match msg {
                    None | Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(m)) => match from_message(m) { Some(f) => f, None => continue },
                };
                last_heard = Instant::now();
                match decode::<WorkerMessage>(&frame)? {
                    WorkerMessage::Ack { version, hash } => {
                        app.db.worker_applied(worker_id, version, &hash, &now_text()).await?;
                        app.workers.acked(worker_id, version);
                        tracing::info!(%worker_id, %version, "worker applied version");
                        app.workers.events.send(Event::Applied {
                            worker_id,
                            worker_name: name.to_owned(),
                            version,
                            at: now_text(),
                        });
                        pos.applied = Some((version, hash));
                        // Only the answer to the newest version sent clears it: Acks of
                        // older versions still queued at the worker must not cause a resend.
                        if pos.in_flight.is_some_and(|f| f <= version) {
                            pos.in_flight = None;
                        }
                        push_if_behind(app, sink, &mut pos).await?;
                    }
                    WorkerMessage::Nack { version, error } => {
                        app.db.worker_rejected(worker_id, version, &error, &now_text()).await?;
                        tracing::warn!(%worker_id, %version, %error, "worker rejected version; it keeps its previous one");
                        app.workers.events.send(Event::Rejected {
                            worker_id,
                            worker_name: name.to_owned(),
                            version,
                            error: error.clone(),
                            at: now_text(),
                        });
                        pos.rejected = Some(version);
                        if pos.in_flight.is_some_and(|f| f <= version) {
                            pos.in_flight = None;
                        }
                        push_if_behind(app, sink, &mut pos).await?;
                    }
                    WorkerMessage::Resync { version } => {
                        tracing::info!(%worker_id, %version, "worker asked for the whole snapshot");
                        pos.resync = true;
                        if pos.in_flight.is_some_and(|f| f <= version) {
                            pos.in_flight = None;
                        }
                        push_if_behind(app, sink, &mut pos).await?;
                    }
                    WorkerMessage::HealthReport { servers } => app.workers.health_report(worker_id, name, servers),
                    // `last_seen` follows the heartbeats, so the registry shows a live worker as live.
                    WorkerMessage::Heartbeat => app.db.worker_seen(worker_id, &now_text()).await?,
                    WorkerMessage::Hello { .. } => anyhow::bail!("Hello sent twice"),
                }
            }
            _ = tick.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    anyhow::bail!("no heartbeat for {:?}", last_heard.elapsed());
                }
                sink.send(to_message(&encode_api(&ApiMessage::Heartbeat))).await?;
            }
            _ = kick.notified() => {
                anyhow::bail!("replaced by a newer session of the same worker");
            }
        }
    }
}

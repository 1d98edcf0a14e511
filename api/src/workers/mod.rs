//! Workers as the API sees them: the live channel sessions ([`Hub`]), the channel itself
//! ([`channel`]) and the managed worker processes ([`supervisor`]).

pub mod channel;
pub mod supervisor;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_shared::channel::{encode_api, ApiMessage, Frame};
use sluice_shared::ConfigVersion;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::db::{Db, DbError};

/// One connected worker.
#[derive(Debug)]
struct Live {
    generation: u64,
    /// Fired to end this session when a newer one for the same worker arrives.
    kick: Arc<Notify>,
}

/// Shared state of the channel sessions.
#[derive(Debug)]
pub struct Hub {
    /// Heartbeat interval both sides keep; a peer silent for 3 intervals is disconnected.
    pub heartbeat: Duration,
    sessions: Mutex<HashMap<Uuid, Live>>,
    next_generation: Mutex<u64>,
    managed: Mutex<HashSet<Uuid>>,
    /// Version each connected worker last acknowledged.
    applied: Mutex<HashMap<Uuid, ConfigVersion>>,
    /// Bumped on every Ack, so waiters can re-check `applied`.
    acks: watch::Sender<u64>,
    /// The encoded snapshot of the newest version, shared by every session that sends it.
    cache: tokio::sync::Mutex<Option<(ConfigVersion, Arc<Frame>)>>,
    /// Each connected worker's latest health report.
    health: Mutex<HashMap<Uuid, Vec<sluice_shared::channel::ServerReport>>>,
    /// Size on the wire of the newest snapshot frame (compressed), for metrics.
    pub snapshot_bytes: std::sync::atomic::AtomicU64,
    /// The live event feed (`GET /v1/events`).
    pub events: crate::events::Events,
}

/// Handle a session keeps while registered.
#[derive(Debug)]
pub struct Registration {
    pub generation: u64,
    pub kick: Arc<Notify>,
}

impl Hub {
    pub fn new(heartbeat: Duration) -> Hub {
        Hub {
            heartbeat,
            sessions: Mutex::default(),
            next_generation: Mutex::new(0),
            managed: Mutex::default(),
            applied: Mutex::default(),
            acks: watch::channel(0).0,
            cache: tokio::sync::Mutex::new(None),
            health: Mutex::default(),
            snapshot_bytes: std::sync::atomic::AtomicU64::new(0),
            events: crate::events::Events::default(),
        }
    }

    /// Register a session for `id`, ending any older session of the same worker.
    pub fn register(&self, id: Uuid) -> Registration {
        let generation = {
            let mut g = self
                .next_generation
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *g += 1;
            *g
        };
        let kick = Arc::new(Notify::new());
        let old = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Live {
                    generation,
                    kick: kick.clone(),
                },
            );
        if let Some(old) = old {
            old.kick.notify_one();
        }
        Registration { generation, kick }
    }

    /// Remove a session (only if it is still the current one for that worker).
    pub fn unregister(&self, id: Uuid, generation: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions
            .get(&id)
            .is_some_and(|l| l.generation == generation)
        {
            sessions.remove(&id);
            self.applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }

    /// Store a worker's health report (it replaces the previous one) and send an event for
    /// every server whose verdict changed.
    pub fn health_report(
        &self,
        id: Uuid,
        name: &str,
        servers: Vec<sluice_shared::channel::ServerReport>,
    ) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let before = health.get(&id).map_or(&[][..], Vec::as_slice);
        let at = crate::db::now_text();
        for (now, was) in crate::events::transitions(before, &servers) {
            self.events.send(crate::events::Event::Health {
                worker_id: id,
                worker_name: name.to_owned(),
                backend_id: now.backend_id,
                server_id: now.server_id,
                from: was.to_owned(),
                to: now.status.clone(),
                last_error: now.last_error.clone(),
                at: at.clone(),
            });
        }
        health.insert(id, servers);
    }

    /// What every connected worker reports about the servers of `backend`: (worker, report).
    pub fn health_of(&self, backend: Uuid) -> Vec<(Uuid, sluice_shared::channel::ServerReport)> {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health
            .iter()
            .flat_map(|(w, reports)| {
                reports
                    .iter()
                    .filter(|r| r.backend_id == backend)
                    .map(move |r| (*w, r.clone()))
            })
            .collect()
    }

    pub fn is_connected(&self, id: Uuid) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id)
    }

    pub fn connected_count(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn set_managed(&self, id: Uuid, managed: bool) {
        let mut set = self.managed.lock().unwrap_or_else(|e| e.into_inner());
        if managed {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }

    pub fn is_managed(&self, id: Uuid) -> bool {
        self.managed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }

    /// Note an Ack.
    pub fn acked(&self, id: Uuid, version: ConfigVersion) {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, version);
        self.acks.send_modify(|n| *n += 1);
    }

    /// Wait until worker `id` is connected and has acknowledged `version` or newer.
    pub async fn wait_applied(&self, id: Uuid, version: ConfigVersion, timeout: Duration) -> bool {
        let mut rx = self.acks.subscribe();
        let check = || {
            self.applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .is_some_and(|v| *v >= version)
        };
        tokio::time::timeout(timeout, async {
            loop {
                if check() {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .is_ok()
    }

    /// The encoded snapshot frame of `version`, built once and shared.
    pub async fn snapshot_frame(
        &self,
        db: &Db,
        version: ConfigVersion,
    ) -> Result<Option<Arc<Frame>>, DbError> {
        let mut cache = self.cache.lock().await;
        if let Some((v, frame)) = cache.as_ref() {
            if *v == version {
                return Ok(Some(frame.clone()));
            }
        }
        let Some(snapshot) = db.snapshot_with_keys(version).await? else {
            return Ok(None);
        };
        let msg = ApiMessage::Snapshot {
            version: snapshot.version,
            hash: snapshot.hash,
            body: snapshot.config,
        };
        let frame = Arc::new(
            tokio::task::spawn_blocking(move || encode_api(&msg))
                .await
                .map_err(|e| DbError::Corrupt {
                    what: "snapshot encoding".into(),
                    reason: e.to_string(),
                })?,
        );
        let size = match frame.as_ref() {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) => b.len(),
        };
        self.snapshot_bytes
            .store(size as u64, std::sync::atomic::Ordering::Relaxed);
        *cache = Some((version, frame.clone()));
        Ok(Some(frame))
    }
}

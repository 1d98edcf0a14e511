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
    /// Encoded frames shared by every session that sends them, and the configurations (keys
    /// included) deltas are computed from.
    cache: tokio::sync::Mutex<Frames>,
    /// Each connected worker's latest health report.
    health: Mutex<HashMap<Uuid, Vec<sluice_shared::channel::ServerReport>>>,
    /// Size on the wire of the newest snapshot or delta frame (compressed), for metrics.
    pub snapshot_bytes: std::sync::atomic::AtomicU64,
    /// The live event feed (`GET /v1/events`).
    pub events: crate::events::Events,
}

/// Configurations kept for deltas (the newest two are what workers are usually on).
const KEPT_CONFIGS: usize = 2;

/// What the sessions share of the snapshots they send.
#[derive(Debug, Default)]
struct Frames {
    /// Recent configurations with keys: (version, hash, config).
    configs: std::collections::VecDeque<(ConfigVersion, String, Arc<sluice_shared::Config>)>,
    /// The full snapshot frame of one version.
    full: Option<(ConfigVersion, Arc<Frame>)>,
    /// The delta frame from one version to another.
    delta: Option<(ConfigVersion, ConfigVersion, Arc<Frame>)>,
}

fn encoding_failed(e: tokio::task::JoinError) -> DbError {
    DbError::Corrupt {
        what: "snapshot encoding".into(),
        reason: e.to_string(),
    }
}

impl Frames {
    /// A version's configuration with keys, from memory or the database.
    async fn config(
        &mut self,
        db: &Db,
        version: ConfigVersion,
    ) -> Result<Option<(String, Arc<sluice_shared::Config>)>, DbError> {
        if let Some((_, hash, c)) = self.configs.iter().find(|(v, _, _)| *v == version) {
            return Ok(Some((hash.clone(), c.clone())));
        }
        let Some(snapshot) = db.snapshot_with_keys(version).await? else {
            return Ok(None);
        };
        let config = Arc::new(snapshot.config);
        self.configs
            .push_back((version, snapshot.hash.clone(), config.clone()));
        self.configs.make_contiguous().sort_by_key(|(v, _, _)| *v);
        while self.configs.len() > KEPT_CONFIGS {
            self.configs.pop_front();
        }
        Ok(Some((snapshot.hash, config)))
    }
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
            cache: tokio::sync::Mutex::new(Frames::default()),
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
        if let Some((v, frame)) = cache.full.as_ref() {
            if *v == version {
                return Ok(Some(frame.clone()));
            }
        }
        let started = std::time::Instant::now();
        let Some((hash, config)) = cache.config(db, version).await? else {
            return Ok(None);
        };
        let loaded_ms = started.elapsed().as_secs_f64() * 1000.0;
        let frame = Arc::new(
            tokio::task::spawn_blocking(move || {
                encode_api(&ApiMessage::Snapshot {
                    version,
                    hash,
                    body: (*config).clone(),
                })
            })
            .await
            .map_err(encoding_failed)?,
        );
        let size = frame_len(&frame);
        self.snapshot_bytes
            .store(size as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(%version, bytes = size, loaded_ms, total_ms = started.elapsed().as_secs_f64() * 1000.0, "snapshot encoded");
        cache.full = Some((version, frame.clone()));
        Ok(Some(frame))
    }

    /// The delta frame from `base` (with content `base_hash`, what the worker applied) to
    /// `version`; `None` when `base` is unknown or its content differs (send the snapshot).
    pub async fn delta_frame(
        &self,
        db: &Db,
        base: ConfigVersion,
        base_hash: &str,
        version: ConfigVersion,
    ) -> Result<Option<Arc<Frame>>, DbError> {
        let mut cache = self.cache.lock().await;
        if let Some((b, v, frame)) = cache.delta.as_ref() {
            if (*b, *v) == (base, version) {
                return Ok(Some(frame.clone()));
            }
        }
        let started = std::time::Instant::now();
        let Some((old_hash, old)) = cache.config(db, base).await? else {
            return Ok(None);
        };
        if old_hash != base_hash {
            return Ok(None);
        }
        let Some((hash, new)) = cache.config(db, version).await? else {
            return Ok(None);
        };
        let frame = Arc::new(
            tokio::task::spawn_blocking(move || {
                encode_api(&ApiMessage::Delta {
                    base,
                    base_hash: old_hash,
                    version,
                    hash,
                    body: sluice_shared::delta::between(&old, &new),
                })
            })
            .await
            .map_err(encoding_failed)?,
        );
        self.snapshot_bytes.store(
            frame_len(&frame) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        tracing::debug!(%base, %version, bytes = frame_len(&frame), total_ms = started.elapsed().as_secs_f64() * 1000.0, "delta encoded");
        cache.delta = Some((base, version, frame.clone()));
        Ok(Some(frame))
    }
}

fn frame_len(frame: &Frame) -> usize {
    match frame {
        Frame::Text(t) => t.len(),
        Frame::Binary(b) => b.len(),
    }
}

//! Managed workers: `sluice-api --workers N` re-executes its own binary in worker mode N times,
//! restarts a worker that dies (with backoff), replaces one on request without a gap (start the
//! new one, wait for its Ack of the current version, then stop the old one), and stops them all
//! when the API stops (SIGTERM, then SIGKILL after a grace period).
//!
//! Each slot keeps a stable worker id and state directory (`<data-dir>/workers/<id>`), so a
//! restarted worker serves its stored snapshot at once. A `worker.pid` file per slot lets an API
//! that was killed with SIGKILL stop the orphans it left behind when it comes back.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::auth::Token;
use crate::db::Db;
use crate::workers::Hub;

/// How long a stopping worker may take to drain before SIGKILL.
pub const GRACE: Duration = Duration::from_secs(15);
/// How long a replacement may take to apply the current version.
pub const REPLACE_TIMEOUT: Duration = Duration::from_secs(30);

/// What managed workers are started with.
#[derive(Debug, Clone)]
pub struct Spec {
    pub exe: PathBuf,
    pub api_url: String,
    pub data_dir: PathBuf,
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub public_https_port: Option<u16>,
    pub worker_token: Token,
}

/// Why a replacement failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error("worker {0} is not a managed worker of this API")]
    NotManaged(Uuid),
    #[error("the replacement could not start: {0}")]
    Spawn(String),
    #[error("the replacement did not apply the current version within {0:?}; the old worker keeps running")]
    Timeout(Duration),
    #[error("the API is shutting down")]
    Stopping,
}

/// Handle on the managed workers.
#[derive(Debug)]
pub struct Supervisor {
    /// Per slot: the id of the worker it runs now, and its command queue.
    slots: Vec<(Arc<std::sync::Mutex<Uuid>>, mpsc::Sender<SlotCommand>)>,
    stop: watch::Sender<bool>,
    tasks: tokio::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A request to a slot's task.
#[derive(Debug)]
pub struct SlotCommand(oneshot::Sender<Result<Uuid, ReplaceError>>);

fn slot_dir(data_dir: &Path, id: Uuid) -> PathBuf {
    data_dir.join("workers").join(id.to_string())
}

/// The ids of the slots, kept in `<data-dir>/workers/slots` so restarts reuse them.
fn slot_ids(data_dir: &Path, count: usize) -> std::io::Result<Vec<Uuid>> {
    let path = data_dir.join("workers").join("slots");
    std::fs::create_dir_all(data_dir.join("workers"))?;
    let mut ids: Vec<Uuid> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    ids.truncate(count);
    while ids.len() < count {
        ids.push(Uuid::new_v4());
    }
    let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
    std::fs::write(&path, text)?;
    Ok(ids)
}

fn save_slot_id(data_dir: &Path, index: usize, id: Uuid) {
    let path = data_dir.join("workers").join("slots");
    let mut ids: Vec<String> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    if index < ids.len() {
        ids[index] = id.to_string();
        let _ = std::fs::write(&path, ids.join("\n") + "\n");
    }
}

/// Send SIGTERM to a process that is not our child, wait up to `grace` for it to exit, then
/// SIGKILL. (Our own children are waited for with `Child::wait`: polling their pid would see
/// the zombie until it is reaped.)
async fn terminate_pid(pid: i32, grace: Duration) {
    let pid = Pid::from_raw(pid);
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if kill(pid, None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// Stop a worker left running by an API that died without stopping it.
async fn stop_orphan(dir: &Path) {
    let Ok(text) = std::fs::read_to_string(dir.join("worker.pid")) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    // Only if that pid is still one of ours: a sluice worker with this state directory.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    if cmdline.contains(" worker ") && cmdline.contains(&dir.display().to_string()) {
        tracing::info!(pid, dir = %dir.display(), "stopping a managed worker left by a previous API process");
        terminate_pid(pid, GRACE).await;
    }
    let _ = std::fs::remove_file(dir.join("worker.pid"));
}

fn spawn_worker(spec: &Spec, id: Uuid, index: usize) -> std::io::Result<Child> {
    let dir = slot_dir(&spec.data_dir, id);
    std::fs::create_dir_all(&dir)?;
    let mut cmd = Command::new(&spec.exe);
    cmd.arg("worker")
        .args([
            "--api",
            &spec.api_url,
            "--name",
            &format!("managed-{index}"),
        ])
        .arg("--state-dir")
        .arg(&dir)
        .args([
            "--https",
            &spec.https.to_string(),
            "--http",
            &spec.http.to_string(),
            "--admin",
            "127.0.0.1:0",
        ])
        .env("SLUICE_WORKER_TOKEN", spec.worker_token.expose())
        .env("SLUICE_WORKER_ID", id.to_string())
        .env_remove("SLUICE_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null());
    if let Some(port) = spec.public_https_port {
        cmd.args(["--public-https-port", &port.to_string()]);
    }
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        let _ = std::fs::write(dir.join("worker.pid"), pid.to_string());
    }
    Ok(child)
}

async fn stop_child(child: &mut Child, dir: &Path) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
            tracing::warn!(
                pid,
                "managed worker did not stop within the grace period; killing it"
            );
            let _ = child.start_kill();
        }
    }
    let _ = child.wait().await;
    let _ = std::fs::remove_file(dir.join("worker.pid"));
}

/// Supervise one slot until the API stops.
#[allow(clippy::too_many_arguments)]
async fn run_slot(
    spec: Arc<Spec>,
    index: usize,
    mut id: Uuid,
    hub: Arc<Hub>,
    db: Arc<Db>,
    mut commands: mpsc::Receiver<SlotCommand>,
    mut stop: watch::Receiver<bool>,
    current_id: Arc<std::sync::Mutex<Uuid>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        hub.set_managed(id, true);
        let mut child = match spawn_worker(&spec, id, index) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a managed worker");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let started = tokio::time::Instant::now();
        tracing::info!(worker_id = %id, pid = child.id(), slot = index, "managed worker started");
        loop {
            tokio::select! {
                status = child.wait() => {
                    tracing::warn!(worker_id = %id, ?status, "managed worker exited; restarting");
                    let _ = std::fs::remove_file(slot_dir(&spec.data_dir, id).join("worker.pid"));
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = Duration::from_millis(100);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    break;
                }
                _ = stop.changed() => {
                    stop_child(&mut child, &slot_dir(&spec.data_dir, id)).await;
                    tracing::info!(worker_id = %id, "managed worker stopped");
                    return;
                }
                cmd = commands.recv() => {
                    let Some(SlotCommand(reply)) = cmd else { continue };
                    let new_id = Uuid::new_v4();
                    hub.set_managed(new_id, true);
                    let mut new_child = match spawn_worker(&spec, new_id, index) {
                        Ok(c) => c,
                        Err(e) => {
                            hub.set_managed(new_id, false);
                            let _ = reply.send(Err(ReplaceError::Spawn(e.to_string())));
                            continue;
                        }
                    };
                    let target = db.subscribe().borrow().unwrap_or(sluice_shared::ConfigVersion::FIRST);
                    if !hub.wait_applied(new_id, target, REPLACE_TIMEOUT).await {
                        stop_child(&mut new_child, &slot_dir(&spec.data_dir, new_id)).await;
                        hub.set_managed(new_id, false);
                        let _ = db.delete_worker(new_id).await;
                        let _ = std::fs::remove_dir_all(slot_dir(&spec.data_dir, new_id));
                        let _ = reply.send(Err(ReplaceError::Timeout(REPLACE_TIMEOUT)));
                        continue;
                    }
                    // The replacement serves the current version: drain the old one.
                    let old_id = id;
                    stop_child(&mut child, &slot_dir(&spec.data_dir, old_id)).await;
                    hub.set_managed(old_id, false);
                    let _ = db.delete_worker(old_id).await;
                    let _ = std::fs::remove_dir_all(slot_dir(&spec.data_dir, old_id));
                    tracing::info!(old = %old_id, new = %new_id, "managed worker replaced");
                    child = new_child;
                    id = new_id;
                    *current_id.lock().unwrap_or_else(|e| e.into_inner()) = id;
                    save_slot_id(&spec.data_dir, index, id);
                    let _ = reply.send(Ok(new_id));
                }
            }
        }
    }
}

impl Supervisor {
    /// Start `count` managed workers (stopping any orphans of a previous API first).
    pub async fn start(
        spec: Spec,
        count: usize,
        hub: Arc<Hub>,
        db: Arc<Db>,
    ) -> std::io::Result<Supervisor> {
        let ids = slot_ids(&spec.data_dir, count)?;
        if let Ok(entries) = std::fs::read_dir(spec.data_dir.join("workers")) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    stop_orphan(&entry.path()).await;
                }
            }
        }
        let spec = Arc::new(spec);
        let (stop, stop_rx) = watch::channel(false);
        let mut slots = Vec::new();
        let mut tasks = Vec::new();
        for (index, id) in ids.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(4);
            let current = Arc::new(std::sync::Mutex::new(id));
            tasks.push(tokio::spawn(run_slot(
                spec.clone(),
                index,
                id,
                hub.clone(),
                db.clone(),
                rx,
                stop_rx.clone(),
                current.clone(),
            )));
            slots.push((current, tx));
        }
        Ok(Supervisor {
            slots,
            stop,
            tasks: tokio::sync::Mutex::new(tasks),
        })
    }

    /// Replace managed worker `id` with a fresh process; returns the new worker's id.
    pub async fn replace(&self, id: Uuid, hub: &Hub) -> Result<Uuid, ReplaceError> {
        if !hub.is_managed(id) {
            return Err(ReplaceError::NotManaged(id));
        }
        let slot = self
            .slots
            .iter()
            .find(|(cur, _)| *cur.lock().unwrap_or_else(|e| e.into_inner()) == id);
        let Some((_, tx)) = slot else {
            return Err(ReplaceError::NotManaged(id));
        };
        let (reply, rx) = oneshot::channel();
        tx.send(SlotCommand(reply))
            .await
            .map_err(|_| ReplaceError::Stopping)?;
        rx.await.map_err(|_| ReplaceError::Stopping)?
    }

    /// Stop every managed worker (SIGTERM, grace period, SIGKILL) and wait for them.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        for task in self.tasks.lock().await.drain(..) {
            let _ = task.await;
        }
    }
}

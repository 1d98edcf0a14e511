//! The worker's state directory: its stable id and the last applied snapshot.
//!
//! The snapshot file holds private keys, so it is written 0600, atomically (temporary file,
//! fsync, rename, fsync of the directory), and starts with the sha256 of the rest so that a
//! torn or tampered file is detected and ignored (with a log line) instead of served. The rest
//! is the snapshot frame exactly as the API sent it (gzip JSON), so saving costs no
//! re-encoding and a tenth of the bytes. Deltas the API sent after it are journaled beside it
//! (`delta-<version>.frame`, same format) and replayed in order on load; a new full snapshot
//! replaces the journal.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sluice_shared::certs::sha256_hex;
use sluice_shared::channel::{decode, encode, ApiMessage, Frame};
use sluice_shared::Snapshot;
use uuid::Uuid;

const SNAPSHOT_FILE: &str = "snapshot.frame";
const DELTA_PREFIX: &str = "delta-";
const DELTA_SUFFIX: &str = ".frame";
const ID_FILE: &str = "worker.id";

/// Why the stored snapshot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is truncated or corrupt (checksum mismatch)")]
    Checksum { path: PathBuf },
    #[error("{path} does not hold a snapshot: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

impl StateDir {
    /// Use (and create, 0700) a state directory.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<StateDir> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(StateDir { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The worker's id: `given` if set (and then remembered), else the stored one, else a new one.
    pub fn worker_id(&self, given: Option<Uuid>) -> std::io::Result<Uuid> {
        let path = self.dir.join(ID_FILE);
        if let Some(id) = given {
            write_atomic(&self.dir, ID_FILE, id.to_string().as_bytes())?;
            return Ok(id);
        }
        if let Ok(text) = fs::read_to_string(&path) {
            if let Ok(id) = text.trim().parse() {
                return Ok(id);
            }
            tracing::warn!(path = %path.display(), "worker id file is unreadable; making a new id");
        }
        let id = Uuid::new_v4();
        write_atomic(&self.dir, ID_FILE, id.to_string().as_bytes())?;
        Ok(id)
    }

    /// Store an applied snapshot (keys included) with its checksum.
    pub fn save(&self, snapshot: &Snapshot) -> std::io::Result<()> {
        let frame = encode(
            &ApiMessage::Snapshot {
                version: snapshot.version,
                hash: snapshot.hash.clone(),
                body: snapshot.config.clone(),
            },
            true,
        );
        self.save_frame(&frame)
    }

    /// Store the snapshot frame the API sent, as it came, with its checksum; the delta journal
    /// before it is dropped.
    pub fn save_frame(&self, frame: &Frame) -> std::io::Result<()> {
        write_atomic(&self.dir, SNAPSHOT_FILE, &with_checksum(frame))?;
        for (_, path) in self.deltas() {
            fs::remove_file(path)?;
        }
        Ok(())
    }

    /// Journal a delta frame the API sent (applied after the stored snapshot); returns how many
    /// deltas the journal holds.
    pub fn append_delta(
        &self,
        version: sluice_shared::ConfigVersion,
        frame: &Frame,
    ) -> std::io::Result<usize> {
        let name = format!("{DELTA_PREFIX}{:020}{DELTA_SUFFIX}", version.get());
        write_atomic(&self.dir, &name, &with_checksum(frame))?;
        Ok(self.deltas().len())
    }

    /// Journaled deltas, oldest first.
    fn deltas(&self) -> Vec<(u64, PathBuf)> {
        let mut out: Vec<(u64, PathBuf)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let v = name
                    .strip_prefix(DELTA_PREFIX)?
                    .strip_suffix(DELTA_SUFFIX)?
                    .parse()
                    .ok()?;
                Some((v, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    /// The stored snapshot with its journaled deltas applied: `Ok(None)` when there is none,
    /// an error when the snapshot is unusable. A delta that is unreadable or does not follow
    /// is logged and ends the replay there.
    pub fn load(&self) -> Result<Option<Snapshot>, StateError> {
        let path = self.dir.join(SNAPSHOT_FILE);
        let Some(message) = read_frame(&path)? else {
            return Ok(None);
        };
        let ApiMessage::Snapshot {
            version,
            hash,
            body,
        } = message
        else {
            return Err(StateError::Parse {
                path,
                reason: "not a snapshot message".into(),
            });
        };
        let mut snapshot = Snapshot {
            version,
            hash,
            config: body,
        };
        for (_, path) in self.deltas() {
            match read_frame(&path) {
                Ok(Some(ApiMessage::Delta {
                    base,
                    base_hash,
                    version,
                    hash,
                    body,
                })) if base == snapshot.version && base_hash == snapshot.hash => {
                    snapshot = Snapshot {
                        version,
                        hash,
                        config: sluice_shared::delta::apply(&snapshot.config, &body),
                    };
                }
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "journaled delta does not follow the stored snapshot; replay stops");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "journaled delta is unusable; replay stops");
                    break;
                }
            }
        }
        Ok(Some(snapshot))
    }
}

fn with_checksum(frame: &Frame) -> Vec<u8> {
    let body = match frame {
        Frame::Text(t) => t.as_bytes(),
        Frame::Binary(b) => b.as_slice(),
    };
    let mut bytes = Vec::with_capacity(body.len() + 65);
    bytes.extend_from_slice(sha256_hex(body).as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(body);
    bytes
}

/// Read, check and decode one stored frame (`Ok(None)`: no such file).
fn read_frame(path: &Path) -> Result<Option<ApiMessage>, StateError> {
    let path = path.to_path_buf();
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path, source }),
    };
    let (sum, body) = match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => return Err(StateError::Checksum { path }),
    };
    if sum != sha256_hex(body).as_bytes() {
        return Err(StateError::Checksum { path });
    }
    // gzip starts with 1f 8b; JSON text never does.
    let frame = if body.starts_with(&[0x1f, 0x8b]) {
        Frame::Binary(body.to_vec())
    } else {
        Frame::Text(String::from_utf8_lossy(body).into_owned())
    };
    decode::<ApiMessage>(&frame)
        .map(Some)
        .map_err(|e| StateError::Parse {
            path,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_shared::{Config, ConfigVersion};

    fn snap() -> Snapshot {
        Snapshot {
            version: ConfigVersion::FIRST,
            hash: "h".into(),
            config: Config::default(),
        }
    }

    #[test]
    fn round_trip_mode_and_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path().join("state")).unwrap();
        assert!(dir.load().unwrap().is_none());
        dir.save(&snap()).unwrap();
        assert_eq!(dir.load().unwrap(), Some(snap()));
        let path = dir.path().join(SNAPSHOT_FILE);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Truncated.
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(dir.load(), Err(StateError::Checksum { .. })));
        // Garbage.
        fs::write(&path, b"nonsense").unwrap();
        assert!(matches!(dir.load(), Err(StateError::Checksum { .. })));
    }

    #[test]
    fn journaled_deltas_replay_in_order_and_stop_at_a_bad_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path().join("state")).unwrap();
        let backend = |name: &str| -> sluice_shared::Backend {
            serde_json::from_value(serde_json::json!({"id": Uuid::new_v4(), "name": name,
                "protocol": "http", "balance": "round_robin", "servers": [], "health_check": {}, "tls": null}))
            .unwrap()
        };
        let v = |n: u64| ConfigVersion::try_from(n).unwrap();
        let mut configs = vec![Config::default()];
        for i in 0..3 {
            let mut next = configs.last().unwrap().clone();
            next.backends.push(backend(&format!("b{i}")));
            next.normalize();
            configs.push(next);
        }
        let hash = |i: usize| format!("h{i}");
        dir.save(&Snapshot {
            version: v(1),
            hash: hash(0),
            config: configs[0].clone(),
        })
        .unwrap();
        for i in 1..=3 {
            let frame = encode(
                &ApiMessage::Delta {
                    base: v(i as u64),
                    base_hash: hash(i - 1),
                    version: v(i as u64 + 1),
                    hash: hash(i),
                    body: sluice_shared::delta::between(&configs[i - 1], &configs[i]),
                },
                true,
            );
            assert_eq!(dir.append_delta(v(i as u64 + 1), &frame).unwrap(), i);
        }
        let loaded = dir.load().unwrap().unwrap();
        assert_eq!((loaded.version, &loaded.config), (v(4), &configs[3]));
        // A torn last delta: the replay stops before it.
        let last = dir.deltas().pop().unwrap().1;
        let bytes = fs::read(&last).unwrap();
        fs::write(&last, &bytes[..bytes.len() - 2]).unwrap();
        let loaded = dir.load().unwrap().unwrap();
        assert_eq!((loaded.version, &loaded.config), (v(3), &configs[2]));
        // A full snapshot replaces the journal.
        dir.save(&Snapshot {
            version: v(9),
            hash: "h9".into(),
            config: configs[1].clone(),
        })
        .unwrap();
        assert!(dir.deltas().is_empty());
        assert_eq!(dir.load().unwrap().unwrap().version, v(9));
    }

    #[test]
    fn worker_id_is_stable() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        let a = dir.worker_id(None).unwrap();
        assert_eq!(dir.worker_id(None).unwrap(), a);
        let given = Uuid::new_v4();
        assert_eq!(dir.worker_id(Some(given)).unwrap(), given);
        assert_eq!(dir.worker_id(None).unwrap(), given);
    }
}

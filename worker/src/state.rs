//! The worker's state directory: its stable id and the last applied snapshot.
//!
//! The snapshot file holds private keys, so it is written 0600, atomically (temporary file,
//! fsync, rename, fsync of the directory), and starts with the sha256 of the rest so that a
//! torn or tampered file is detected and ignored (with a log line) instead of served.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sluice_shared::certs::sha256_hex;
use sluice_shared::Snapshot;
use uuid::Uuid;

const SNAPSHOT_FILE: &str = "snapshot.json";
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
    #[error("{path} does not hold a snapshot: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
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
        let body = serde_json::to_vec(snapshot).map_err(std::io::Error::other)?;
        let mut bytes = Vec::with_capacity(body.len() + 65);
        bytes.extend_from_slice(sha256_hex(&body).as_bytes());
        bytes.push(b'\n');
        bytes.extend_from_slice(&body);
        write_atomic(&self.dir, SNAPSHOT_FILE, &bytes)
    }

    /// The stored snapshot: `Ok(None)` when there is none, an error when it is unusable.
    pub fn load(&self) -> Result<Option<Snapshot>, StateError> {
        let path = self.dir.join(SNAPSHOT_FILE);
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
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }
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

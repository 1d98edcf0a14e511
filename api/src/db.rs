//! All SQL of Sluice, behind a narrow interface: [`Db`] for reads and [`WriteTx`] for the one
//! write transaction at a time. No other module builds a query.
//!
//! SQLite runs in WAL mode with foreign keys on and `synchronous=FULL`, so an acknowledged
//! commit survives `kill -9` and power loss. Writers are serialized twice: by an in-process lock
//! (so concurrent requests queue instead of spinning on `SQLITE_BUSY`) and by `BEGIN IMMEDIATE`
//! (so a second process could never interleave). The version counter lives in the database.

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use sluice_shared::{Backend, Certificate, Config, ConfigVersion, Host};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, SqliteExecutor, SqlitePool, Transaction};
use tokio::sync::{watch, Mutex, OwnedMutexGuard};
use uuid::Uuid;

/// Certificate facts by certificate id.
pub type CertFactsById = std::collections::HashMap<Uuid, sluice_shared::certs::CertFacts>;

/// Failures of the store.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error("migrating the database failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored {what} cannot be read: {reason}")]
    Corrupt { what: String, reason: String },
}

impl DbError {
    /// Did a UNIQUE constraint refuse the write?
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, DbError::Sqlx(sqlx::Error::Database(e)) if e.is_unique_violation())
    }
}

pub type DbResult<T> = Result<T, DbError>;

/// A stored object with its timestamps (RFC 3339, UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<T> {
    pub item: T,
    pub created_at: String,
    pub updated_at: String,
}

/// One row of the version history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub version: ConfigVersion,
    pub hash: String,
    pub created_at: String,
    pub summary: String,
    pub restored_from: Option<u64>,
}

/// The current time as stored: RFC 3339 in UTC with microseconds.
pub fn now_text() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.microsecond() * 1000)
        .unwrap_or(now);
    sluice_shared::certs::rfc3339(now)
}

fn corrupt(what: impl Into<String>, reason: impl ToString) -> DbError {
    DbError::Corrupt {
        what: what.into(),
        reason: reason.to_string(),
    }
}

fn from_json<T: DeserializeOwned>(what: &str, text: &str) -> DbResult<T> {
    serde_json::from_str(text).map_err(|e| corrupt(what, e))
}

/// Store a serde enum (like `Protocol::H2c`) as its plain text (`h2c`).
fn enum_text<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

fn enum_from<T: DeserializeOwned>(what: &str, text: &str) -> DbResult<T> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|e| corrupt(what, e))
}

/// A history snapshot as stored: gzip-compressed JSON.
fn gzip_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    use std::io::Write;
    // Encoded whole first: the compressor is much faster fed in one piece than token by token.
    let json = serde_json::to_vec(v).unwrap_or_default();
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(json.len() / 8),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(&json);
    enc.finish().unwrap_or_default()
}

fn gunzip(gz: &[u8]) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz).read_to_string(&mut text)?;
    Ok(text)
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Model types are plain data; their JSON encoding cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

fn uuid_col(row: &sqlx::sqlite::SqliteRow, col: &str) -> DbResult<Uuid> {
    let text: String = row.try_get(col)?;
    Uuid::from_str(&text).map_err(|e| corrupt(col, e))
}

fn opt_uuid_col(row: &sqlx::sqlite::SqliteRow, col: &str) -> DbResult<Option<Uuid>> {
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| Uuid::from_str(&t).map_err(|e| corrupt(col, e)))
        .transpose()
}

fn stamps<T>(row: &sqlx::sqlite::SqliteRow, item: T) -> DbResult<Stored<T>> {
    Ok(Stored {
        item,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn certificate_row(row: &sqlx::sqlite::SqliteRow) -> DbResult<Stored<Certificate>> {
    let item = Certificate {
        id: uuid_col(row, "id")?,
        name: row.try_get("name")?,
        cert_pem: row.try_get("cert_pem")?,
        key_sha256: row.try_get("key_sha256")?,
        key_pem: None,
    };
    stamps(row, item)
}

fn backend_row(row: &sqlx::sqlite::SqliteRow) -> DbResult<Stored<Backend>> {
    let tls: Option<String> = row.try_get("tls")?;
    let item = Backend {
        id: uuid_col(row, "id")?,
        name: row.try_get("name")?,
        protocol: enum_from("backend protocol", &row.try_get::<String, _>("protocol")?)?,
        balance: enum_from("backend balance", &row.try_get::<String, _>("balance")?)?,
        servers: from_json("backend servers", &row.try_get::<String, _>("servers")?)?,
        health_check: from_json(
            "backend health_check",
            &row.try_get::<String, _>("health_check")?,
        )?,
        tls: tls.map(|t| from_json("backend tls", &t)).transpose()?,
    };
    stamps(row, item)
}

fn host_row(row: &sqlx::sqlite::SqliteRow) -> DbResult<Stored<Host>> {
    let hostname: String = row.try_get("hostname")?;
    let item = Host {
        id: uuid_col(row, "id")?,
        hostname: hostname.parse().map_err(|e| corrupt("hostname", e))?,
        mode: enum_from("host mode", &row.try_get::<String, _>("mode")?)?,
        backend_id: uuid_col(row, "backend_id")?,
        certificate_id: opt_uuid_col(row, "certificate_id")?,
        request_headers: from_json(
            "host request_headers",
            &row.try_get::<String, _>("request_headers")?,
        )?,
        proxy_protocol: enum_from(
            "host proxy_protocol",
            &row.try_get::<String, _>("proxy_protocol")?,
        )?,
    };
    stamps(row, item)
}

fn version_row(row: &sqlx::sqlite::SqliteRow) -> DbResult<VersionRow> {
    let v: i64 = row.try_get("version")?;
    let restored: Option<i64> = row.try_get("restored_from")?;
    Ok(VersionRow {
        version: ConfigVersion::try_from(v as u64).map_err(|e| corrupt("version", e))?,
        hash: row.try_get("hash")?,
        created_at: row.try_get("created_at")?,
        summary: row.try_get("summary")?,
        restored_from: restored.map(|r| r as u64),
    })
}

const CERT_COLS: &str = "id, name, cert_pem, key_sha256, created_at, updated_at";
const BACKEND_COLS: &str =
    "id, name, protocol, balance, servers, health_check, tls, created_at, updated_at";
const HOST_COLS: &str = "id, hostname, mode, backend_id, certificate_id, request_headers, \
                         proxy_protocol, created_at, updated_at";
const VERSION_COLS: &str = "version, hash, created_at, summary, restored_from";

async fn list_certificates<'e>(ex: impl SqliteExecutor<'e>) -> DbResult<Vec<Stored<Certificate>>> {
    let rows = sqlx::query(&format!("SELECT {CERT_COLS} FROM certificates ORDER BY id"))
        .fetch_all(ex)
        .await?;
    rows.iter().map(certificate_row).collect()
}

async fn get_certificate<'e>(
    ex: impl SqliteExecutor<'e>,
    id: Uuid,
) -> DbResult<Option<Stored<Certificate>>> {
    let row = sqlx::query(&format!(
        "SELECT {CERT_COLS} FROM certificates WHERE id = ?"
    ))
    .bind(id.to_string())
    .fetch_optional(ex)
    .await?;
    row.as_ref().map(certificate_row).transpose()
}

async fn list_backends<'e>(ex: impl SqliteExecutor<'e>) -> DbResult<Vec<Stored<Backend>>> {
    let rows = sqlx::query(&format!("SELECT {BACKEND_COLS} FROM backends ORDER BY id"))
        .fetch_all(ex)
        .await?;
    rows.iter().map(backend_row).collect()
}

async fn get_backend<'e>(
    ex: impl SqliteExecutor<'e>,
    id: Uuid,
) -> DbResult<Option<Stored<Backend>>> {
    let row = sqlx::query(&format!("SELECT {BACKEND_COLS} FROM backends WHERE id = ?"))
        .bind(id.to_string())
        .fetch_optional(ex)
        .await?;
    row.as_ref().map(backend_row).transpose()
}

async fn list_hosts<'e>(ex: impl SqliteExecutor<'e>) -> DbResult<Vec<Stored<Host>>> {
    let rows = sqlx::query(&format!("SELECT {HOST_COLS} FROM hosts ORDER BY id"))
        .fetch_all(ex)
        .await?;
    rows.iter().map(host_row).collect()
}

async fn get_host<'e>(ex: impl SqliteExecutor<'e>, id: Uuid) -> DbResult<Option<Stored<Host>>> {
    let row = sqlx::query(&format!("SELECT {HOST_COLS} FROM hosts WHERE id = ?"))
        .bind(id.to_string())
        .fetch_optional(ex)
        .await?;
    row.as_ref().map(host_row).transpose()
}

async fn latest_version<'e>(ex: impl SqliteExecutor<'e>) -> DbResult<Option<VersionRow>> {
    let row = sqlx::query(&format!(
        "SELECT {VERSION_COLS} FROM config_versions ORDER BY version DESC LIMIT 1"
    ))
    .fetch_optional(ex)
    .await?;
    row.as_ref().map(version_row).transpose()
}

async fn version_snapshot<'e>(
    ex: impl SqliteExecutor<'e>,
    v: ConfigVersion,
) -> DbResult<Option<(VersionRow, Config)>> {
    let row = sqlx::query(&format!(
        "SELECT {VERSION_COLS}, snapshot, snapshot_gz FROM config_versions WHERE version = ?"
    ))
    .bind(v.get() as i64)
    .fetch_optional(ex)
    .await?;
    match row {
        None => Ok(None),
        Some(row) => {
            let meta = version_row(&row)?;
            let what = format!("snapshot of version {v}");
            let config = match row.try_get::<Option<Vec<u8>>, _>("snapshot_gz")? {
                Some(gz) => from_json(&what, &gunzip(&gz).map_err(|e| corrupt(&what, e))?)?,
                None => from_json(&what, &row.try_get::<String, _>("snapshot")?)?,
            };
            Ok(Some((meta, config)))
        }
    }
}

/// The configuration store.
#[derive(Debug)]
pub struct Db {
    pool: SqlitePool,
    write_lock: Arc<Mutex<()>>,
    /// The newest committed config, cached so a write need not re-read it to compute its diff.
    current: RwLock<Option<(ConfigVersion, Arc<Config>)>>,
    /// Facts of the newest version's certificates, so validation need not parse them again.
    facts: RwLock<Option<(ConfigVersion, Arc<CertFactsById>)>>,
    committed: watch::Sender<Option<ConfigVersion>>,
}

impl Db {
    /// Open (creating if needed) the database at `path` and apply pending migrations.
    pub async fn open(path: &Path) -> DbResult<Db> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // Deleted rows are overwritten with zeros, so a pruned private key does not stay
            // readable in the file's free pages.
            .pragma("secure_delete", "on")
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        sqlx::migrate!("../migrations").run(&pool).await?;
        let (committed, _) = watch::channel(None);
        let db = Db {
            pool,
            write_lock: Arc::new(Mutex::new(())),
            current: RwLock::new(None),
            facts: RwLock::new(None),
            committed,
        };
        if let Some(v) = latest_version(&db.pool).await? {
            db.committed.send_replace(Some(v.version));
        }
        Ok(db)
    }

    /// Is the database answering?
    pub async fn ping(&self) -> DbResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Integrity check result (`ok` when healthy).
    pub async fn integrity_check(&self) -> DbResult<String> {
        Ok(sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Watch the newest committed version.
    pub fn subscribe(&self) -> watch::Receiver<Option<ConfigVersion>> {
        self.committed.subscribe()
    }

    /// Start the write transaction; waits for any other writer to finish.
    pub async fn begin_write(&self) -> DbResult<WriteTx<'_>> {
        let guard = self.write_lock.clone().lock_owned().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(WriteTx {
            db: self,
            tx,
            _guard: guard,
        })
    }

    pub async fn list_certificates(&self) -> DbResult<Vec<Stored<Certificate>>> {
        list_certificates(&self.pool).await
    }
    pub async fn get_certificate(&self, id: Uuid) -> DbResult<Option<Stored<Certificate>>> {
        get_certificate(&self.pool, id).await
    }
    pub async fn list_backends(&self) -> DbResult<Vec<Stored<Backend>>> {
        list_backends(&self.pool).await
    }
    pub async fn get_backend(&self, id: Uuid) -> DbResult<Option<Stored<Backend>>> {
        get_backend(&self.pool, id).await
    }
    pub async fn list_hosts(&self) -> DbResult<Vec<Stored<Host>>> {
        list_hosts(&self.pool).await
    }
    pub async fn get_host(&self, id: Uuid) -> DbResult<Option<Stored<Host>>> {
        get_host(&self.pool, id).await
    }

    /// The newest committed version.
    pub async fn current_version(&self) -> DbResult<Option<VersionRow>> {
        latest_version(&self.pool).await
    }

    /// One version's row (hash, time, summary) without its snapshot.
    pub async fn version_row(&self, v: ConfigVersion) -> DbResult<Option<VersionRow>> {
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLS} FROM config_versions WHERE version = ?"
        ))
        .bind(v.get() as i64)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(version_row).transpose()
    }

    /// History, newest first: at most `limit` versions below `before` (if given).
    pub async fn list_versions(
        &self,
        limit: u32,
        before: Option<u64>,
    ) -> DbResult<Vec<VersionRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {VERSION_COLS} FROM config_versions WHERE version < ? ORDER BY version DESC LIMIT ?"
        ))
        .bind(before.map_or(i64::MAX, |b| b as i64))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version_row).collect()
    }

    /// One version with its (key-free) configuration.
    pub async fn get_version(&self, v: ConfigVersion) -> DbResult<Option<(VersionRow, Config)>> {
        version_snapshot(&self.pool, v).await
    }

    /// Copy the write-ahead log into the database file and empty it, so the images of pages as
    /// they were before a deletion are gone from both files. False when a reader still needed
    /// the log and it could not be emptied.
    pub async fn checkpoint(&self) -> DbResult<bool> {
        let row = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)? == 0)
    }
}

/// The single write transaction. Dropping it without [`WriteTx::commit`] rolls back.
pub struct WriteTx<'a> {
    db: &'a Db,
    tx: Transaction<'static, Sqlite>,
    _guard: OwnedMutexGuard<()>,
}

impl std::fmt::Debug for WriteTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteTx")
    }
}

impl WriteTx<'_> {
    pub async fn get_certificate(&mut self, id: Uuid) -> DbResult<Option<Stored<Certificate>>> {
        get_certificate(&mut *self.tx, id).await
    }
    pub async fn get_backend(&mut self, id: Uuid) -> DbResult<Option<Stored<Backend>>> {
        get_backend(&mut *self.tx, id).await
    }
    pub async fn get_host(&mut self, id: Uuid) -> DbResult<Option<Stored<Host>>> {
        get_host(&mut *self.tx, id).await
    }

    /// The stored key text for a key hash, if any.
    pub async fn key_pem(&mut self, sha: &str) -> DbResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT key_pem FROM private_keys WHERE sha256 = ?")
                .bind(sha)
                .fetch_optional(&mut *self.tx)
                .await?,
        )
    }

    /// The stored private keys: (sha256 of each, in order, that no certificate of the current
    /// configuration uses; how many are in use).
    pub async fn key_use(&mut self) -> DbResult<(Vec<String>, u64)> {
        let unused = sqlx::query_scalar(
            "SELECT sha256 FROM private_keys
             WHERE sha256 NOT IN (SELECT key_sha256 FROM certificates) ORDER BY sha256",
        )
        .fetch_all(&mut *self.tx)
        .await?;
        let used: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT key_sha256) FROM certificates")
            .fetch_one(&mut *self.tx)
            .await?;
        Ok((unused, used as u64))
    }

    /// Delete the private keys no certificate of the current configuration uses.
    pub async fn delete_unused_keys(&mut self) -> DbResult<u64> {
        let done = sqlx::query(
            "DELETE FROM private_keys WHERE sha256 NOT IN (SELECT key_sha256 FROM certificates)",
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected())
    }

    /// Commit a write that makes no new version (one that changes no configuration).
    pub async fn commit_unversioned(self) -> DbResult<()> {
        self.tx.commit().await?;
        Ok(())
    }

    /// Store a private key (idempotent: keys are content-addressed).
    pub async fn put_key(&mut self, sha: &str, key_pem: &str, now: &str) -> DbResult<()> {
        sqlx::query("INSERT INTO private_keys (sha256, key_pem, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING")
            .bind(sha)
            .bind(key_pem)
            .bind(now)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Insert or update a certificate; `updated_at` moves only when something changed.
    pub async fn upsert_certificate(&mut self, c: &Certificate, now: &str) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO certificates (id, name, cert_pem, key_sha256, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, cert_pem = excluded.cert_pem,
               key_sha256 = excluded.key_sha256, updated_at = excluded.updated_at
             WHERE name IS NOT excluded.name OR cert_pem IS NOT excluded.cert_pem
               OR key_sha256 IS NOT excluded.key_sha256",
        )
        .bind(c.id.to_string())
        .bind(&c.name)
        .bind(&c.cert_pem)
        .bind(&c.key_sha256)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Insert or update a backend; `updated_at` moves only when something changed.
    pub async fn upsert_backend(&mut self, b: &Backend, now: &str) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO backends (id, name, protocol, balance, servers, health_check, tls, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, protocol = excluded.protocol,
               balance = excluded.balance, servers = excluded.servers,
               health_check = excluded.health_check, tls = excluded.tls, updated_at = excluded.updated_at
             WHERE name IS NOT excluded.name OR protocol IS NOT excluded.protocol
               OR balance IS NOT excluded.balance OR servers IS NOT excluded.servers
               OR health_check IS NOT excluded.health_check OR tls IS NOT excluded.tls",
        )
        .bind(b.id.to_string())
        .bind(&b.name)
        .bind(enum_text(&b.protocol))
        .bind(enum_text(&b.balance))
        .bind(to_json(&b.servers))
        .bind(to_json(&b.health_check))
        .bind(b.tls.as_ref().map(to_json))
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Insert or update a host; `updated_at` moves only when something changed.
    pub async fn upsert_host(&mut self, h: &Host, now: &str) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO hosts (id, hostname, mode, backend_id, certificate_id, request_headers, proxy_protocol, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
             ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, mode = excluded.mode,
               backend_id = excluded.backend_id, certificate_id = excluded.certificate_id,
               request_headers = excluded.request_headers, proxy_protocol = excluded.proxy_protocol,
               updated_at = excluded.updated_at
             WHERE hostname IS NOT excluded.hostname OR mode IS NOT excluded.mode
               OR backend_id IS NOT excluded.backend_id OR certificate_id IS NOT excluded.certificate_id
               OR request_headers IS NOT excluded.request_headers
               OR proxy_protocol IS NOT excluded.proxy_protocol",
        )
        .bind(h.id.to_string())
        .bind(h.hostname.as_str())
        .bind(enum_text(&h.mode))
        .bind(h.backend_id.to_string())
        .bind(h.certificate_id.map(|c| c.to_string()))
        .bind(to_json(&h.request_headers))
        .bind(enum_text(&h.proxy_protocol))
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Delete one object; returns whether it existed.
    pub async fn delete(
        &mut self,
        kind: sluice_shared::validate::ObjectKind,
        id: Uuid,
    ) -> DbResult<bool> {
        let table = kind.collection();
        let done = sqlx::query(&format!("DELETE FROM {table} WHERE id = ?"))
            .bind(id.to_string())
            .execute(&mut *self.tx)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Hostnames of the hosts that name this backend or certificate.
    pub async fn referrers(
        &mut self,
        kind: sluice_shared::validate::ObjectKind,
        id: Uuid,
    ) -> DbResult<Vec<String>> {
        use sluice_shared::validate::ObjectKind;
        let column = match kind {
            ObjectKind::Backend => "backend_id",
            ObjectKind::Certificate => "certificate_id",
            ObjectKind::Host => return Ok(Vec::new()),
        };
        Ok(sqlx::query_scalar(&format!(
            "SELECT hostname FROM hosts WHERE {column} = ? ORDER BY hostname"
        ))
        .bind(id.to_string())
        .fetch_all(&mut *self.tx)
        .await?)
    }

    /// Make the stored configuration equal to `config` (keys must already be stored): objects
    /// missing from it are deleted, the others inserted or updated.
    pub async fn replace_config(&mut self, config: &Config, now: &str) -> DbResult<()> {
        // Deletions come first (so names freed by removed objects can be reused), while hosts
        // that stay may still point at removed backends or certificates until they are updated
        // below: foreign keys are checked at commit, when everything is in place again.
        sqlx::query("PRAGMA defer_foreign_keys = ON")
            .execute(&mut *self.tx)
            .await?;
        let keep = |ids: Vec<Uuid>| -> String {
            serde_json::to_string(&ids.iter().map(Uuid::to_string).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        for (table, ids) in [
            ("hosts", keep(config.hosts.iter().map(|h| h.id).collect())),
            (
                "backends",
                keep(config.backends.iter().map(|b| b.id).collect()),
            ),
            (
                "certificates",
                keep(config.certificates.iter().map(|c| c.id).collect()),
            ),
        ] {
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE id NOT IN (SELECT value FROM json_each(?))"
            ))
            .bind(ids)
            .execute(&mut *self.tx)
            .await?;
        }
        for c in &config.certificates {
            self.upsert_certificate(c, now).await?;
        }
        for b in &config.backends {
            self.upsert_backend(b, now).await?;
        }
        for h in &config.hosts {
            self.upsert_host(h, now).await?;
        }
        Ok(())
    }

    /// The configuration as it stands inside this transaction (keys named, not included).
    pub async fn load_config(&mut self) -> DbResult<Config> {
        let mut config = Config {
            certificates: list_certificates(&mut *self.tx)
                .await?
                .into_iter()
                .map(|s| s.item)
                .collect(),
            backends: list_backends(&mut *self.tx)
                .await?
                .into_iter()
                .map(|s| s.item)
                .collect(),
            hosts: list_hosts(&mut *self.tx)
                .await?
                .into_iter()
                .map(|s| s.item)
                .collect(),
        };
        config.normalize();
        Ok(config)
    }

    /// The newest committed version and its configuration (from the cache when it is current).
    pub async fn current(&mut self) -> DbResult<Option<(VersionRow, Arc<Config>)>> {
        let Some(row) = latest_version(&mut *self.tx).await? else {
            return Ok(None);
        };
        let cached = self.db.current.read().ok().and_then(|c| c.clone());
        if let Some((v, config)) = cached {
            if v == row.version {
                return Ok(Some((row, config)));
            }
        }
        let (row, config) = version_snapshot(&mut *self.tx, row.version)
            .await?
            .ok_or_else(|| corrupt("config_versions", "newest version vanished"))?;
        Ok(Some((row, Arc::new(config))))
    }

    /// A stored version's configuration.
    pub async fn version(&mut self, v: ConfigVersion) -> DbResult<Option<(VersionRow, Config)>> {
        version_snapshot(&mut *self.tx, v).await
    }

    /// Record `config` as version `row.version` and commit everything.
    /// Facts of version `v`'s certificates, if they are cached.
    pub fn cached_facts(&self, v: ConfigVersion) -> Option<Arc<CertFactsById>> {
        let f = self.db.facts.read().ok()?;
        f.as_ref()
            .filter(|(fv, _)| *fv == v)
            .map(|(_, m)| m.clone())
    }

    /// Record `config` as version `row.version` and commit everything; `facts` are its
    /// certificates' facts, kept for the next write's validation.
    pub async fn commit_version(
        mut self,
        row: &VersionRow,
        config: Arc<Config>,
        facts: CertFactsById,
    ) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO config_versions (version, hash, created_at, summary, restored_from, snapshot, snapshot_gz)
             VALUES (?, ?, ?, ?, ?, '', ?)",
        )
        .bind(row.version.get() as i64)
        .bind(&row.hash)
        .bind(&row.created_at)
        .bind(&row.summary)
        .bind(row.restored_from.map(|r| r as i64))
        .bind(gzip_json(&*config))
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        if let Ok(mut cur) = self.db.current.write() {
            *cur = Some((row.version, config));
        }
        if let Ok(mut f) = self.db.facts.write() {
            *f = Some((row.version, Arc::new(facts)));
        }
        self.db.committed.send_replace(Some(row.version));
        Ok(())
    }
}

/// A worker as the registry stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRow {
    pub id: Uuid,
    pub name: String,
    pub managed: bool,
    pub address: Option<String>,
    pub admin_address: Option<String>,
    pub first_seen: String,
    pub last_seen: String,
    pub applied_version: Option<u64>,
    pub applied_hash: Option<String>,
    pub applied_at: Option<String>,
    pub last_error: Option<String>,
    pub last_error_version: Option<u64>,
    pub last_error_at: Option<String>,
}

/// A worker's answer to one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRow {
    pub status: String,
    pub error: Option<String>,
    pub at: String,
}

/// What a worker said in its Hello.
#[derive(Debug, Clone)]
pub struct HelloRecord<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub managed: bool,
    pub address: Option<&'a str>,
    pub admin_address: Option<&'a str>,
    pub applied_version: Option<u64>,
    pub applied_hash: Option<&'a str>,
}

const WORKER_COLS: &str =
    "id, name, managed, address, admin_address, first_seen, last_seen, applied_version, \
                           applied_hash, applied_at, last_error, last_error_version, last_error_at";

fn worker_row(row: &sqlx::sqlite::SqliteRow) -> DbResult<WorkerRow> {
    let v = |col: &str| -> DbResult<Option<u64>> {
        Ok(row.try_get::<Option<i64>, _>(col)?.map(|v| v as u64))
    };
    Ok(WorkerRow {
        id: uuid_col(row, "id")?,
        name: row.try_get("name")?,
        managed: row.try_get::<i64, _>("managed")? != 0,
        address: row.try_get("address")?,
        admin_address: row.try_get("admin_address")?,
        first_seen: row.try_get("first_seen")?,
        last_seen: row.try_get("last_seen")?,
        applied_version: v("applied_version")?,
        applied_hash: row.try_get("applied_hash")?,
        applied_at: row.try_get("applied_at")?,
        last_error: row.try_get("last_error")?,
        last_error_version: v("last_error_version")?,
        last_error_at: row.try_get("last_error_at")?,
    })
}

impl Db {
    /// The newest committed configuration if it is version `v` and cached in memory.
    pub fn cached(&self, v: ConfigVersion) -> Option<Arc<Config>> {
        let cur = self.current.read().ok()?;
        cur.as_ref()
            .filter(|(cv, _)| *cv == v)
            .map(|(_, c)| c.clone())
    }

    /// The full snapshot of a version, private keys included, for the worker channel only.
    pub async fn snapshot_with_keys(
        &self,
        v: ConfigVersion,
    ) -> DbResult<Option<sluice_shared::Snapshot>> {
        // The newest version is usually in memory already; older ones come from the history.
        let (row, mut config) = match self.cached(v) {
            Some(config) => {
                let row = sqlx::query(&format!(
                    "SELECT {VERSION_COLS} FROM config_versions WHERE version = ?"
                ))
                .bind(v.get() as i64)
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row.as_ref().map(version_row).transpose()? else {
                    return Ok(None);
                };
                (row, Config::clone(&config))
            }
            None => match version_snapshot(&self.pool, v).await? {
                Some(found) => found,
                None => return Ok(None),
            },
        };
        let wanted: Vec<&str> = config
            .certificates
            .iter()
            .map(|c| c.key_sha256.as_str())
            .collect();
        let rows = sqlx::query(
            "SELECT sha256, key_pem FROM private_keys WHERE sha256 IN (SELECT value FROM json_each(?))",
        )
        .bind(serde_json::to_string(&wanted).unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        let mut keys = std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            keys.insert(
                r.try_get::<String, _>("sha256")?,
                r.try_get::<String, _>("key_pem")?,
            );
        }
        for cert in &mut config.certificates {
            cert.key_pem = keys.get(&cert.key_sha256).cloned();
        }
        Ok(Some(sluice_shared::Snapshot {
            version: row.version,
            hash: row.hash,
            config,
        }))
    }

    /// Record a worker's Hello (creating it on first contact).
    pub async fn worker_hello(&self, h: &HelloRecord<'_>, now: &str) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO workers (id, name, managed, address, admin_address, first_seen, last_seen, applied_version, applied_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, managed = excluded.managed,
               address = excluded.address, admin_address = excluded.admin_address,
               last_seen = excluded.last_seen, applied_version = excluded.applied_version,
               applied_hash = excluded.applied_hash",
        )
        .bind(h.id.to_string())
        .bind(h.name)
        .bind(h.managed as i64)
        .bind(h.address)
        .bind(h.admin_address)
        .bind(now)
        .bind(h.applied_version.map(|v| v as i64))
        .bind(h.applied_hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Record an Ack: the worker now serves `version`.
    pub async fn worker_applied(
        &self,
        id: Uuid,
        version: ConfigVersion,
        hash: &str,
        now: &str,
    ) -> DbResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE workers SET applied_version = ?, applied_hash = ?, applied_at = ?, last_seen = ? WHERE id = ?")
            .bind(version.get() as i64)
            .bind(hash)
            .bind(now)
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT OR REPLACE INTO rollout (worker_id, version, status, error, at) VALUES (?, ?, 'applied', NULL, ?)")
            .bind(id.to_string())
            .bind(version.get() as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Record a Nack: the worker refused `version` and keeps its previous one.
    pub async fn worker_rejected(
        &self,
        id: Uuid,
        version: ConfigVersion,
        error: &str,
        now: &str,
    ) -> DbResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE workers SET last_error = ?, last_error_version = ?, last_error_at = ?, last_seen = ? WHERE id = ?")
            .bind(error)
            .bind(version.get() as i64)
            .bind(now)
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT OR REPLACE INTO rollout (worker_id, version, status, error, at) VALUES (?, ?, 'rejected', ?, ?)")
            .bind(id.to_string())
            .bind(version.get() as i64)
            .bind(error)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Note that a worker was heard from (or went away) at `now`.
    pub async fn worker_seen(&self, id: Uuid, now: &str) -> DbResult<()> {
        sqlx::query("UPDATE workers SET last_seen = ? WHERE id = ?")
            .bind(now)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn list_workers(&self) -> DbResult<Vec<WorkerRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {WORKER_COLS} FROM workers ORDER BY name, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(worker_row).collect()
    }

    pub async fn get_worker(&self, id: Uuid) -> DbResult<Option<WorkerRow>> {
        let row = sqlx::query(&format!("SELECT {WORKER_COLS} FROM workers WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(worker_row).transpose()
    }

    /// Forget a worker and its rollout rows; returns whether it existed.
    pub async fn delete_worker(&self, id: Uuid) -> DbResult<bool> {
        let done = sqlx::query("DELETE FROM workers WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every known worker with its answer to `version`, if it gave one.
    pub async fn rollout(
        &self,
        version: ConfigVersion,
    ) -> DbResult<Vec<(WorkerRow, Option<RolloutRow>)>> {
        let workers = self.list_workers().await?;
        let rows =
            sqlx::query("SELECT worker_id, status, error, at FROM rollout WHERE version = ?")
                .bind(version.get() as i64)
                .fetch_all(&self.pool)
                .await?;
        let mut answers = std::collections::HashMap::new();
        for r in &rows {
            answers.insert(
                uuid_col(r, "worker_id")?,
                RolloutRow {
                    status: r.try_get("status")?,
                    error: r.try_get("error")?,
                    at: r.try_get("at")?,
                },
            );
        }
        Ok(workers
            .into_iter()
            .map(|w| {
                let a = answers.remove(&w.id);
                (w, a)
            })
            .collect())
    }
}

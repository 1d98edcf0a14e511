-- Sluice configuration store: the resources, their private keys, and the version history.
-- An applied migration is never edited; add a new numbered file instead.

-- Private keys, content-addressed by the sha256 of their PEM text. Kept apart from
-- certificates so that version history can name a key (key_sha256) without holding it, and a
-- restore of an old version can find it again.
CREATE TABLE private_keys (
    sha256     TEXT PRIMARY KEY NOT NULL,
    key_pem    TEXT NOT NULL,
    created_at TEXT NOT NULL
) STRICT;

CREATE TABLE certificates (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL UNIQUE,
    cert_pem    TEXT NOT NULL,
    key_sha256  TEXT NOT NULL REFERENCES private_keys (sha256),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
) STRICT;

-- servers, health_check and tls are JSON documents of the sluice-shared model types.
CREATE TABLE backends (
    id           TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL UNIQUE,
    protocol     TEXT NOT NULL,
    balance      TEXT NOT NULL,
    servers      TEXT NOT NULL,
    health_check TEXT NOT NULL,
    tls          TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
) STRICT;

CREATE TABLE hosts (
    id              TEXT PRIMARY KEY NOT NULL,
    hostname        TEXT NOT NULL UNIQUE,
    mode            TEXT NOT NULL,
    backend_id      TEXT NOT NULL REFERENCES backends (id),
    certificate_id  TEXT REFERENCES certificates (id),
    request_headers TEXT NOT NULL,
    proxy_protocol  TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
) STRICT;

CREATE INDEX hosts_backend ON hosts (backend_id);
CREATE INDEX hosts_certificate ON hosts (certificate_id);

-- One row per committed version, written in the same transaction as the change. The snapshot
-- is the sluice-shared Config as JSON, with keys named by key_sha256 only.
CREATE TABLE config_versions (
    version       INTEGER PRIMARY KEY NOT NULL,
    hash          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    summary       TEXT NOT NULL,
    restored_from INTEGER,
    snapshot      TEXT NOT NULL
) STRICT;

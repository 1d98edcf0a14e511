-- Worker registry and per-version rollout status. These are not configuration: writing them
-- never creates a config version.

CREATE TABLE workers (
    id                 TEXT PRIMARY KEY NOT NULL,
    name               TEXT NOT NULL,
    managed            INTEGER NOT NULL,
    address            TEXT,
    admin_address      TEXT,
    first_seen         TEXT NOT NULL,
    last_seen          TEXT NOT NULL,
    applied_version    INTEGER,
    applied_hash       TEXT,
    applied_at         TEXT,
    last_error         TEXT,
    last_error_version INTEGER,
    last_error_at      TEXT
) STRICT;

-- One row per (worker, version) the worker answered: applied or rejected, with its error.
CREATE TABLE rollout (
    worker_id TEXT NOT NULL REFERENCES workers (id) ON DELETE CASCADE,
    version   INTEGER NOT NULL,
    status    TEXT NOT NULL,
    error     TEXT,
    at        TEXT NOT NULL,
    PRIMARY KEY (worker_id, version)
) STRICT;

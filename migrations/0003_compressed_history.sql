-- History snapshots are stored gzip-compressed (about a tenth of the bytes written and
-- fsynced per commit). Rows written before keep their JSON text in `snapshot`; new rows
-- leave it empty and fill `snapshot_gz`.
ALTER TABLE config_versions ADD COLUMN snapshot_gz BLOB;

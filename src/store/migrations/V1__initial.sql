-- credbroker store schema, version 1. Records are the same JSON documents the sled store keeps:
-- metadata in clear, credentials sealed (AES-256-GCM envelope bound to the system id).
CREATE TABLE IF NOT EXISTS systems (
    system_id TEXT PRIMARY KEY,
    revision  BIGINT NOT NULL,
    record    BYTEA  NOT NULL
);
CREATE TABLE IF NOT EXISTS callers (
    name   TEXT PRIMARY KEY,
    record BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

-- credbroker store schema, version 2: the system event log (WatchSystems resumes, webhooks).
-- Bodies are the broker's JSON events (metadata only, no secret) with an integrity tag.
CREATE TABLE IF NOT EXISTS events (
    seq  BIGINT PRIMARY KEY,
    at   BIGINT NOT NULL,
    body BYTEA  NOT NULL
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);

-- The projection: one current snapshot per account, folded from the event log.
-- It can always be rebuilt from `events`; nothing here is the record of truth.
CREATE TABLE account_snapshots (
    account_id          uuid        PRIMARY KEY,
    user_id             uuid        NOT NULL,
    status              text        NOT NULL CHECK (status IN ('active', 'removed')),
    connection_status   text,
    resource            jsonb,
    -- resource.updated_at, for queries by hand (the fold compares the exact value in `resource`).
    resource_updated_at timestamptz,
    version             bigint      NOT NULL CHECK (version > 0),
    last_position       bigint      NOT NULL,
    last_event          text        NOT NULL,
    first_seen_at       timestamptz NOT NULL,
    last_event_at       timestamptz NOT NULL,
    removed_at          timestamptz
);

CREATE INDEX account_snapshots_user_idx ON account_snapshots (user_id);

-- How far each projection has folded the log. Written in the same transaction as the snapshots.
CREATE TABLE projector_checkpoints (
    name     text   PRIMARY KEY,
    position bigint NOT NULL CHECK (position >= 0)
);

INSERT INTO projector_checkpoints (name, position) VALUES ('account_snapshots', 0);

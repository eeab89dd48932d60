-- Events the fold refused (a resource that is not an object, an updated_at that is not a string,
-- a body that no longer parses). They stay in the log; this table says why they were not folded.
CREATE TABLE quarantine (
    position       bigint      PRIMARY KEY REFERENCES events (position),
    account_id     uuid,
    event          text        NOT NULL,
    error          text        NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now()
);

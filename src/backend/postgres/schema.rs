//! agentmount's own schema in Postgres: versioned migrations the daemon applies at mount
//! (one transaction each, under an advisory lock so hosts mounting at once do not race).
//! docs/POSTGRES.md describes the tables for programs in other languages.

use postgres::Client;

/// Which version of the schema this build reads and writes. A database at a newer version
/// (written by a newer agentmount) is refused at mount.
pub const VERSION: i32 = 1;

/// The advisory lock key migrations run under ("agentmount" in ASCII, truncated).
const MIGRATE_LOCK: i64 = 0x6167_656e_746d_6f75;
/// The advisory lock key one cluster-wide garbage collection holds.
pub const GC_LOCK: i64 = 0x6167_656e_7467_6330;

/// The channel every change is announced on (payload: see docs/POSTGRES.md).
pub const CHANNEL: &str = "agentmount";

const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    r#"
CREATE SEQUENCE agentmount_version;

-- One row per record. `body` holds the record's exact bytes (UTF-8 JSON text, never
-- re-serialised); `version` is unique across the store and moves on every change (set by a
-- trigger, so any SQL client's write is versioned and announced too).
CREATE TABLE agentmount_records (
    collection text   NOT NULL,
    id         text   NOT NULL,
    body       text   NOT NULL,
    version    bigint NOT NULL DEFAULT nextval('agentmount_version'),
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (collection, id)
);

-- Content-addressed attachments: `hex` is the SHA-256 of the bytes, which are kept in
-- `agentmount_chunks` (1 MiB each, n = 0, 1, ...). A blob row exists only once all its
-- chunks are written (same transaction).
CREATE TABLE agentmount_blobs (
    hex        text   PRIMARY KEY CHECK (hex ~ '^[0-9a-f]{64}$'),
    size       bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    version    bigint NOT NULL DEFAULT nextval('agentmount_version')
);
CREATE TABLE agentmount_chunks (
    -- Deferrable: an ingest streams its chunks in under a staging key while the bytes
    -- arrive, and renames them to the hash (with the blob row) before it commits.
    hex  text    NOT NULL REFERENCES agentmount_blobs (hex) ON DELETE CASCADE
                 DEFERRABLE INITIALLY IMMEDIATE,
    n    integer NOT NULL,
    data bytea   NOT NULL,
    PRIMARY KEY (hex, n)
);
-- The metadata sidecar of a blob (its exact bytes) and the label it carries, if any.
CREATE TABLE agentmount_sidecars (
    hex        text   PRIMARY KEY REFERENCES agentmount_blobs (hex) ON DELETE CASCADE,
    body       bytea  NOT NULL,
    label      text   UNIQUE,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    version    bigint NOT NULL DEFAULT nextval('agentmount_version')
);
-- The write-ahead manifest: an intent per ingested blob; committed once a record refers
-- to it. Only uncommitted, unreferenced intents older than the grace are reclaimed by gc.
CREATE TABLE agentmount_manifest (
    hex          text PRIMARY KEY,
    session_id   text,
    intent_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    committed_at timestamptz
);

CREATE FUNCTION agentmount_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := nextval('agentmount_version');
    IF TG_TABLE_NAME <> 'agentmount_blobs' THEN
        NEW.changed_at := clock_timestamp();
    END IF;
    RETURN NEW;
END $$;

-- Payload: "r <version|-> <collection> <id>" for records, "b <version|-> <hex>" for blobs
-- and sidecars ("-": gone).
CREATE FUNCTION agentmount_announce() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'agentmount_records' THEN
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('agentmount', 'r - ' || OLD.collection || ' ' || OLD.id);
        ELSE
            IF TG_OP = 'UPDATE' AND (OLD.collection, OLD.id) <> (NEW.collection, NEW.id) THEN
                PERFORM pg_notify('agentmount', 'r - ' || OLD.collection || ' ' || OLD.id);
            END IF;
            PERFORM pg_notify('agentmount', 'r ' || NEW.version || ' ' || NEW.collection || ' ' || NEW.id);
        END IF;
    ELSE
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('agentmount', 'b - ' || OLD.hex);
        ELSE
            PERFORM pg_notify('agentmount', 'b ' || NEW.version || ' ' || NEW.hex);
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER agentmount_records_stamp BEFORE INSERT OR UPDATE ON agentmount_records
    FOR EACH ROW EXECUTE FUNCTION agentmount_stamp();
CREATE TRIGGER agentmount_blobs_stamp BEFORE INSERT OR UPDATE ON agentmount_blobs
    FOR EACH ROW EXECUTE FUNCTION agentmount_stamp();
CREATE TRIGGER agentmount_sidecars_stamp BEFORE INSERT OR UPDATE ON agentmount_sidecars
    FOR EACH ROW EXECUTE FUNCTION agentmount_stamp();
CREATE TRIGGER agentmount_records_announce AFTER INSERT OR UPDATE OR DELETE ON agentmount_records
    FOR EACH ROW EXECUTE FUNCTION agentmount_announce();
CREATE TRIGGER agentmount_blobs_announce AFTER INSERT OR DELETE ON agentmount_blobs
    FOR EACH ROW EXECUTE FUNCTION agentmount_announce();
CREATE TRIGGER agentmount_sidecars_announce AFTER INSERT OR UPDATE OR DELETE ON agentmount_sidecars
    FOR EACH ROW EXECUTE FUNCTION agentmount_announce();
"#,
)];

/// Brings the database's schema to [`VERSION`]. Returns the version found before.
pub fn migrate(c: &mut Client) -> Result<i32, String> {
    let sql = |e: postgres::Error| super::describe(&e);
    // The lock first: hosts mounting a new database at once would otherwise race even on
    // CREATE TABLE IF NOT EXISTS (a duplicate type name). DDL is transactional in
    // Postgres, so all of it commits together or not at all.
    let mut tx = c.transaction().map_err(sql)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .map_err(sql)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS agentmount_schema (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .map_err(sql)?;
    let found: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM agentmount_schema",
            &[],
        )
        .map_err(sql)?
        .try_get(0)
        .map_err(sql)?;
    if found > VERSION {
        return Err(format!(
            "the database's agentmount schema is version {found}, newer than this build reads ({VERSION}); upgrade agentmount"
        ));
    }
    for (v, script) in MIGRATIONS {
        if *v > found {
            tx.batch_execute(script)
                .map_err(|e| format!("migration {v}: {}", super::describe(&e)))?;
            tx.execute("INSERT INTO agentmount_schema (version) VALUES ($1)", &[v])
                .map_err(sql)?;
            tracing::info!(version = v, "applied schema migration");
        }
    }
    tx.commit().map_err(sql)?;
    Ok(found)
}

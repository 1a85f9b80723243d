//! The state store's schema and its versions.
//!
//! Owns the tables' definitions and how a `state.db` of any earlier release becomes one of
//! this release: `PRAGMA user_version` is the schema version, and [`MIGRATIONS`] are applied
//! in order, all in one transaction, when the store opens. A database from a newer release
//! (a version above the last migration) is refused rather than misread. What is stored and
//! how it is queried is `store.rs`.
//!
//! Releases before schema versions left `user_version` at 0 with migration 1's tables: such
//! a database is adopted as version 1 once its tables and columns are checked to be exactly
//! those. A new migration is appended, never edited: a database in the field may be at any
//! version below it.

use rusqlite::{Connection, TransactionBehavior};

/// Schema migrations; `MIGRATIONS[i]` takes a database from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    V1_TABLES,
    V2_ACTIONS_BY_TIME,
    V3_CLAIM_LEASES,
    V4_RUN_DECISION,
    V5_RUN_SOURCE,
];

/// The schema version this release writes.
#[cfg(test)]
const LATEST: u32 = MIGRATIONS.len() as u32;

/// Version 1: the tables of every release before schema versions, verbatim.
const V1_TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY,
    message_id  TEXT,
    received_at INTEGER NOT NULL,
    finished_at INTEGER,
    instance_id TEXT,
    group_name  TEXT,
    hook        TEXT,
    transition  TEXT,
    token       TEXT,
    layer       TEXT,
    outcome     TEXT NOT NULL,
    hook_result TEXT,
    heartbeats  INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    event       TEXT,
    notified    INTEGER NOT NULL DEFAULT 1,
    result_json TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_instance ON runs(instance_id, id);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs(received_at);
CREATE TABLE IF NOT EXISTS steps (
    run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    description TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    outcome     TEXT NOT NULL,
    detail      TEXT,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS actions (
    token      TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    owner      TEXT NOT NULL,
    run_id     INTEGER,
    result     TEXT,
    updated_at INTEGER NOT NULL
);
"#;

/// Version 2: pruning deletes finished actions by age (`Store::prune`), which scanned the
/// whole table without this index.
const V2_ACTIONS_BY_TIME: &str = r#"
CREATE INDEX actions_by_time ON actions(updated_at);
"#;

/// Version 3: claims hold a lease (`claims.rs`); another owner takes a claim over only once
/// it expired. Claims from before leases read 0: expired.
const V3_CLAIM_LEASES: &str = r#"
ALTER TABLE actions ADD COLUMN lease_until INTEGER NOT NULL DEFAULT 0;
"#;

/// Version 4: a run's decision (the result it sent, or tried to: CONTINUE | ABANDON) and
/// its cause, apart from what completing came to (`hook_result`, which may be
/// `timed-out`).
const V4_RUN_DECISION: &str = r#"
ALTER TABLE runs ADD COLUMN decision TEXT;
ALTER TABLE runs ADD COLUMN cause TEXT;
"#;

/// Version 5: the account and region of the source a run came through (`[sources.NAME]`,
/// or `[queue]`'s), which `provision history` shows and filters by. Rows from before are
/// left NULL (their event JSON may still name the account: `Store::history_where`).
const V5_RUN_SOURCE: &str = r#"
ALTER TABLE runs ADD COLUMN account TEXT;
ALTER TABLE runs ADD COLUMN region TEXT;
"#;

/// The columns of migration 1's tables, in order: what an unversioned database must have to
/// be adopted as version 1.
const V1_COLUMNS: &[(&str, &[&str])] = &[
    (
        "runs",
        &[
            "id",
            "message_id",
            "received_at",
            "finished_at",
            "instance_id",
            "group_name",
            "hook",
            "transition",
            "token",
            "layer",
            "outcome",
            "hook_result",
            "heartbeats",
            "error",
            "event",
            "notified",
            "result_json",
        ],
    ),
    (
        "steps",
        &[
            "run_id",
            "idx",
            "kind",
            "description",
            "started_at",
            "finished_at",
            "outcome",
            "detail",
        ],
    ),
    (
        "actions",
        &["token", "state", "owner", "run_id", "result", "updated_at"],
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "schema version {found} was written by a newer release of provision (this one knows \
         versions up to {known}); run that release or a later one, or move the file aside to \
         start a new history"
    )]
    TooNew { found: u32, known: u32 },
    #[error(
        "not a provision state store: it has no schema version and {0}; move the file aside \
         or point state.path elsewhere"
    )]
    Unrecognized(String),
    #[error("migrating the schema from version {from} to {to}: {source}")]
    Migration {
        from: u32,
        to: u32,
        source: rusqlite::Error,
    },
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Brings the database to the latest version (one per migration), returning the version it was at.
pub fn migrate(conn: &mut Connection) -> Result<u32, SchemaError> {
    migrate_with(conn, MIGRATIONS)
}

/// [`migrate`] with a given list of migrations (tests use a list that fails midway).
fn migrate_with(conn: &mut Connection, migrations: &[&str]) -> Result<u32, SchemaError> {
    let latest = migrations.len() as u32;
    // Cheap and lock-free in the common case: already current.
    let found = version(conn)?;
    if found == latest {
        return Ok(found);
    }
    if found > latest {
        return Err(SchemaError::TooNew {
            found,
            known: latest,
        });
    }
    // IMMEDIATE takes the write lock at once: of two processes opening the same file (the
    // daemon, `provision history`), one migrates and the other then finds it done.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let before = version(&tx)?;
    if before > latest {
        return Err(SchemaError::TooNew {
            found: before,
            known: latest,
        });
    }
    let mut at = before;
    if at == 0 && adopt_unversioned(&tx)? {
        at = 1;
    }
    for (i, sql) in migrations.iter().enumerate().skip(at as usize) {
        let to = i as u32 + 1;
        tx.execute_batch(sql)
            .map_err(|source| SchemaError::Migration {
                from: at,
                to,
                source,
            })?;
        at = to;
    }
    tx.pragma_update(None, "user_version", at)?;
    tx.commit()?;
    if before != at {
        tracing::info!(from = before, to = at, "state store schema migrated");
    }
    Ok(before)
}

fn version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

/// An unversioned database: empty (false: every migration is to be applied), or written by
/// a release before schema versions (true: it is at version 1). Anything else is refused.
fn adopt_unversioned(conn: &Connection) -> Result<bool, SchemaError> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if tables.is_empty() {
        return Ok(false);
    }
    for (table, want) in V1_COLUMNS {
        let have: Vec<String> = conn
            .prepare(&format!(
                "SELECT name FROM pragma_table_info('{table}') ORDER BY cid"
            ))?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if have.is_empty() {
            return Err(SchemaError::Unrecognized(format!(
                "no table {table} (it has {})",
                tables.join(", ")
            )));
        }
        if have != *want {
            return Err(SchemaError::Unrecognized(format!(
                "table {table} has columns {} instead of {}",
                have.join(", "),
                want.join(", ")
            )));
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::{Claim, Claims};
    use crate::store::Store;

    const LEASE: std::time::Duration = std::time::Duration::from_secs(60);
    use std::path::{Path, PathBuf};

    fn fixture_copy(dir: &Path) -> PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store/state-v0.db");
        let dst = dir.join("state.db");
        std::fs::copy(&src, &dst).unwrap();
        dst
    }

    fn user_version(path: &Path) -> u32 {
        version(&Connection::open(path).unwrap()).unwrap()
    }

    fn indexes(path: &Path) -> Vec<String> {
        Connection::open(path)
            .unwrap()
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[tokio::test]
    async fn a_database_from_before_schema_versions_keeps_its_history_after_migrating() {
        let dir = tempfile::tempdir().unwrap();
        let path = fixture_copy(dir.path());
        assert_eq!(user_version(&path), 0);

        let store = Store::open(&path).unwrap();
        assert_eq!(user_version(&path), LATEST);
        assert!(indexes(&path).contains(&"actions_by_time".to_string()));

        // Every run and step reads back exactly as the old release wrote and read them.
        let want: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/store/state-v0.history.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let have = serde_json::to_value(store.history(None, 100).unwrap()).unwrap();
        assert_eq!(have, want);
        assert_eq!(
            store
                .history(Some("i-0123456789abcdef0"), 10)
                .unwrap()
                .len(),
            1
        );

        // The claims are where they were: done stays done, decided only completes, a claim
        // left running by a dead process is taken over.
        assert_eq!(
            store.claim("tok-done", "new", 99, LEASE).await.unwrap(),
            Claim::Done {
                run_id: Some(1),
                result: Some(crate::outcome::Completion::Completed(
                    crate::outcome::HookResult::Continue
                ))
            }
        );
        assert_eq!(
            store.claim("tok-decided", "new", 99, LEASE).await.unwrap(),
            Claim::Decided(crate::outcome::HookResult::Continue)
        );
        assert_eq!(
            store.claim("tok-running", "new", 99, LEASE).await.unwrap(),
            Claim::Fresh {
                from: Some("host-b".into())
            }
        );
        // The result event that could not be published is still in the outbox.
        let outbox = store.unpublished(10).await.unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].0, 2);
        assert!(outbox[0].1.contains("\"outcome\":\"failed\""), "{outbox:?}");
        // And the store goes on writing.
        let id = store
            .insert_run(crate::store::NewRun {
                outcome: crate::outcome::Outcome::Skipped,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(id, 6);
    }

    #[test]
    fn a_new_database_gets_every_migration_and_reopening_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        Store::open(&path).unwrap();
        assert_eq!(user_version(&path), LATEST);
        let first = indexes(&path);
        assert!(first.contains(&"actions_by_time".to_string()), "{first:?}");
        let mut c = Connection::open(&path).unwrap();
        assert_eq!(migrate(&mut c).unwrap(), LATEST);
        drop(c);
        Store::open(&path).unwrap();
        assert_eq!(indexes(&path), first);
    }

    #[test]
    fn a_database_from_a_newer_release_is_refused_with_the_versions_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        Store::open(&path).unwrap();
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", LATEST + 1)
            .unwrap();
        let err = Store::open(&path).err().expect("a newer schema is refused");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!(
                "schema version {} was written by a newer release of provision (this one knows versions up to {LATEST})",
                LATEST + 1
            )),
            "{msg}"
        );
        // Nothing was written: the file still says what the newer release wrote.
        assert_eq!(user_version(&path), LATEST + 1);
    }

    #[test]
    fn a_failing_migration_leaves_the_database_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = fixture_copy(dir.path());
        let mut c = Connection::open(&path).unwrap();
        let broken = [
            V1_TABLES,
            "CREATE TABLE half_done (x INTEGER);",
            "SELECT nonsense(",
        ];
        let err = migrate_with(&mut c, &broken).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("migrating the schema from version 2 to 3:"),
            "{err}"
        );
        drop(c);
        // One transaction: neither version 2's table nor a new version number survived.
        assert_eq!(user_version(&path), 0);
        let c = Connection::open(&path).unwrap();
        let half: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'half_done'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(half, 0);
    }

    #[test]
    fn an_unversioned_database_with_other_tables_is_not_taken_for_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT);")
            .unwrap();
        let msg = Store::open(&path).err().unwrap().to_string();
        assert!(
            msg.contains("not a provision state store")
                && msg.contains("table runs has columns id, name instead of id, message_id"),
            "{msg}"
        );
        assert_eq!(user_version(&path), 0);
    }
}

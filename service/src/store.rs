//! SQLite history and idempotency.
//!
//! Owns the state file: one row per message handled (`runs`), one per step (`steps`), and one
//! per lifecycle action token (`actions`) that says whether the action is being worked,
//! decided (steps finished, hook not yet completed) or done. The claim on a token is what
//! makes redelivery harmless. Calls are small and synchronous; async callers go through
//! `spawn_blocking` so a slow disk never stalls the runtime. The tables' definitions and
//! their versions are `store_schema.rs`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::claims::{self, Claim, ClaimError, ClaimState, Claims};
use crate::clock::now_ms;
use crate::outcome::{Completion, HookResult, Outcome, StepOutcome};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state store: cannot create {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("state store: background task failed: {0}")]
    Join(String),
    #[error("state store {path}: {source}")]
    Schema {
        path: String,
        source: crate::store_schema::SchemaError,
    },
}

/// The last word on a run.
#[derive(Debug, Clone, Default)]
pub struct RunEnd<'a> {
    pub outcome: Outcome,
    pub hook_result: Option<Completion>,
    /// Left as it is when None (recorded before completing: [`Store::note_decision`]).
    pub decision: Option<HookResult>,
    pub cause: Option<&'a str>,
    pub heartbeats: u32,
    pub error: Option<&'a str>,
    pub unpublished: Option<&'a str>,
}

/// The first row of a run.
#[derive(Debug, Clone, Default)]
pub struct NewRun<'a> {
    pub message_id: Option<&'a str>,
    pub instance_id: Option<&'a str>,
    pub group: Option<&'a str>,
    pub hook: Option<&'a str>,
    pub transition: Option<&'a str>,
    pub token: Option<&'a str>,
    pub layer: Option<&'a str>,
    pub outcome: Outcome,
    pub error: Option<&'a str>,
    pub event: Option<&'a str>,
    /// The account and region of the source the message came through.
    pub account: Option<&'a str>,
    pub region: Option<&'a str>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunRow {
    pub id: i64,
    pub message_id: Option<String>,
    pub received_at: i64,
    pub finished_at: Option<i64>,
    pub instance_id: Option<String>,
    pub group: Option<String>,
    pub hook: Option<String>,
    pub transition: Option<String>,
    pub layer: Option<String>,
    /// The account and region of the source the run came through (None for runs recorded
    /// before the history kept them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub outcome: Outcome,
    pub hook_result: Option<Completion>,
    /// The result the run decided on and sent (or tried to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<HookResult>,
    /// Why that decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    pub heartbeats: i64,
    pub error: Option<String>,
    pub steps: Vec<StepRow>,
}

/// An outcome as `provision history --outcome` names it.
pub fn parse_outcome(word: &str) -> Option<Outcome> {
    Outcome::parse(word)
}

/// Which runs `provision history` shows (every given field must match).
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub instance: Option<String>,
    pub group: Option<String>,
    pub account: Option<String>,
    pub region: Option<String>,
    pub outcome: Option<Outcome>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepRow {
    pub idx: i64,
    pub kind: String,
    pub description: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: String,
    pub detail: Option<String>,
}

/// Puts the connection in WAL mode. Setting the journal mode answers SQLITE_BUSY at once,
/// without the busy handler, while another process closes its last connection (it then
/// checkpoints and removes the WAL): `provision history` opened as the daemon stops, say.
/// That passes in milliseconds, so it is tried again for up to 5 seconds.
fn set_wal(conn: &Connection) -> Result<(), rusqlite::Error> {
    let mut tries = 0;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 100 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// "state store /var/lib/provision/state.db", for messages.
    label: Arc<str>,
    /// Held by whoever republishes the outbox ([`Store::outbox_turn`]).
    outbox: Arc<tokio::sync::Mutex<()>>,
    /// Runs of this process whose staged result event their own run still publishes (from
    /// [`Store::stage_result`] to [`Store::finish_run`]): not the outbox's to send.
    staged: Arc<Mutex<std::collections::HashSet<i64>>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::secret::create_private_dir(dir).map_err(|source| StoreError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        // 0600 from the start (SQLite gives its -wal and -shm files the same mode).
        if let Err(source) = crate::secret::create_private_file(path) {
            return Err(StoreError::Dir {
                path: path.display().to_string(),
                source,
            });
        }
        let conn = Connection::open(path)?;
        Self::init(conn, &path.display().to_string())
    }

    pub fn in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?, ":memory:")
    }

    fn init(mut conn: Connection, path: &str) -> Result<Store, StoreError> {
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL lets `provision history` read while the daemon writes; NORMAL skips an fsync per
        // commit (a power cut may lose the last runs, never corrupt the file).
        set_wal(&conn)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // The tables, and any migration an older release's file needs (store_schema.rs).
        crate::store_schema::migrate(&mut conn).map_err(|source| StoreError::Schema {
            path: path.to_string(),
            source,
        })?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            label: format!("state store {path}").into(),
            outbox: Arc::default(),
            staged: Arc::default(),
        })
    }

    /// Runs `f` on the connection off the async runtime.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, rusqlite::Error> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&guard).map_err(StoreError::from)
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Runs `f` on the connection here, blocking (CLI commands).
    pub fn call_blocking<R>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, rusqlite::Error>,
    ) -> Result<R, StoreError> {
        let guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&guard).map_err(StoreError::from)
    }

    pub async fn insert_run(&self, run: NewRun<'_>) -> Result<i64, StoreError> {
        let v: Vec<Option<String>> = [
            run.message_id,
            run.instance_id,
            run.group,
            run.hook,
            run.transition,
            run.token,
            run.layer,
            run.error,
            run.event,
            run.account,
            run.region,
        ]
        .iter()
        .map(|s| s.map(str::to_string))
        .collect();
        let finished = (run.outcome != Outcome::Running).then(now_ms);
        let outcome = run.outcome.as_str();
        self.call(move |c| {
            c.execute(
                "INSERT INTO runs (message_id, received_at, finished_at, instance_id, group_name, hook, transition, token, layer, outcome, error, event, account, region)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                params![v[0], now_ms(), finished, v[1], v[2], v[3], v[4], v[5], v[6], outcome, v[7], v[8], v[9], v[10]],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    /// Records the end of a run. `end.unpublished` is the result event that could not be
    /// published yet (kept for [`Store::unpublished`]).
    pub async fn finish_run(&self, run_id: i64, end: RunEnd<'_>) -> Result<(), StoreError> {
        let outcome = end.outcome.as_str();
        let hook_result = end.hook_result.map(Completion::as_str);
        let decision = end.decision.map(HookResult::as_str);
        let cause = end.cause.map(str::to_string);
        let error = end.error.map(str::to_string);
        let unpublished = end.unpublished.map(str::to_string);
        let heartbeats = end.heartbeats;
        let r = self.call(move |c| {
            c.execute(
                "UPDATE runs SET finished_at = ?2, outcome = ?3, hook_result = ?4, heartbeats = ?5, error = ?6,
                   notified = ?7, result_json = ?8, decision = COALESCE(?9, decision),
                   cause = COALESCE(?10, cause) WHERE id = ?1",
                params![run_id, now_ms(), outcome, hook_result, heartbeats, error, unpublished.is_none(), unpublished, decision, cause],
            )?;
            Ok(())
        })
        .await;
        // Its own publish is over (sent, or left for the outbox), recorded or not.
        self.staged.lock().unwrap().remove(&run_id);
        r
    }

    /// A run's decision and its cause, recorded before completing (a crash after this
    /// leaves them for the redelivery that completes the decision to report).
    pub async fn note_decision(
        &self,
        run_id: i64,
        decision: HookResult,
        cause: &str,
    ) -> Result<(), StoreError> {
        let cause = cause.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET decision = ?2, cause = ?3 WHERE id = ?1",
                params![run_id, decision.as_str(), cause],
            )?;
            Ok(())
        })
        .await
    }

    /// The latest run of a token that recorded a decision: its id and cause.
    pub async fn decision_of(
        &self,
        token: &str,
    ) -> Result<Option<(i64, Option<String>)>, StoreError> {
        let token = token.to_string();
        self.call(move |c| {
            let row = c
                .query_row(
                    "SELECT id, cause FROM runs WHERE token = ?1 AND decision IS NOT NULL ORDER BY id DESC LIMIT 1",
                    [token],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(row)
        })
        .await
    }

    /// Result events whose publication failed, oldest first (the outbox).
    pub async fn unpublished(&self, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        // Staged by a run of this process still under way: its run publishes it (else the
        // outbox and the run would both send it). A crash leaves them to the next process.
        let staged: Vec<i64> = self.staged.lock().unwrap().iter().copied().collect();
        let rows: Vec<(i64, String)> = self
            .call(move |c| {
                let mut stmt = c.prepare(
                    "SELECT id, result_json FROM runs WHERE notified = 0 AND result_json IS NOT NULL ORDER BY id LIMIT ?1",
                )?;
                let rows = stmt.query_map([(limit + staged.len()) as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
                rows.collect::<Result<Vec<_>, _>>()
                    .map(|v| v.into_iter().filter(|(id, _)| !staged.contains(id)).collect())
            })
            .await?;
        Ok(rows.into_iter().take(limit).collect())
    }

    /// The turn to republish the outbox: every source's loop tries, over this one store,
    /// and two at once would send the same event twice. None while another has it.
    pub fn outbox_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.outbox.clone().try_lock_owned().ok()
    }

    /// Puts a run's result event in the outbox before its action is recorded done, so a
    /// crash before it is published leaves it to [`Store::unpublished`].
    pub async fn stage_result(&self, run_id: i64, body: &str) -> Result<(), StoreError> {
        self.staged.lock().unwrap().insert(run_id);
        let body = body.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET notified = 0, result_json = ?2 WHERE id = ?1",
                params![run_id, body],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn mark_published(&self, run_id: i64) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET notified = 1, result_json = NULL WHERE id = ?1",
                [run_id],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn start_step(
        &self,
        run_id: i64,
        idx: usize,
        kind: &str,
        description: &str,
    ) -> Result<(), StoreError> {
        let (kind, description) = (kind.to_string(), description.to_string());
        self.call(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO steps (run_id, idx, kind, description, started_at, outcome) VALUES (?1, ?2, ?3, ?4, ?5, 'running')",
                params![run_id, idx as i64, kind, description, now_ms()],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn finish_step(
        &self,
        run_id: i64,
        idx: usize,
        outcome: StepOutcome,
        detail: &str,
    ) -> Result<(), StoreError> {
        let (outcome, detail) = (outcome.as_str(), detail.to_string());
        self.call(move |c| {
            c.execute(
                "UPDATE steps SET finished_at = ?3, outcome = ?4, detail = ?5 WHERE run_id = ?1 AND idx = ?2",
                params![run_id, idx as i64, now_ms(), outcome, detail],
            )
            .map(|_| ())
        })
        .await
    }

    /// Deletes runs and finished actions older than `keep`. Lifecycle actions live at most
    /// 48 hours in AWS, so a token older than that can never come back.
    pub async fn prune(&self, keep: Duration, junk_rows: usize) -> Result<usize, StoreError> {
        let cutoff = now_ms() - keep.as_millis() as i64;
        self.call(move |c| {
            let mut n = c.execute("DELETE FROM runs WHERE received_at < ?1", [cutoff])?;
            n += c.execute(
                "DELETE FROM runs WHERE outcome IN ('rejected', 'skipped', 'unmatched')
                 AND id NOT IN (SELECT id FROM runs
                   WHERE outcome IN ('rejected', 'skipped', 'unmatched')
                   ORDER BY id DESC LIMIT ?1)",
                [junk_rows as i64],
            )?;
            c.execute("DELETE FROM actions WHERE updated_at < ?1", [cutoff])?;
            Ok(n)
        })
        .await
    }

    /// A claim row, read inside `c`'s transaction. Only this host uses the file: a row whose
    /// owner process is gone reads as expired.
    fn claim_row(c: &Connection, token: &str) -> rusqlite::Result<Option<claims::Row>> {
        let mut row = Self::stored_claim(c, token)?;
        if let Some(r) = row
            .as_mut()
            .filter(|r| claims::gone_from_this_host(&r.owner))
        {
            r.lease_until_ms = 0;
        }
        Ok(row)
    }

    fn stored_claim(c: &Connection, token: &str) -> rusqlite::Result<Option<claims::Row>> {
        c.query_row(
            "SELECT state, owner, lease_until, run_id, result FROM actions WHERE token = ?1",
            [token],
            |r| {
                Ok(claims::Row {
                    state: ClaimState::parse(&r.get::<_, String>(0)?),
                    owner: r.get(1)?,
                    lease_until_ms: r.get(2)?,
                    run_id: r.get(3)?,
                    result: word(r.get(4)?, Completion::parse),
                })
            },
        )
        .optional()
    }

    async fn claim_call<R, F>(&self, f: F) -> Result<R, ClaimError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, rusqlite::Error> + Send + 'static,
    {
        self.call(f)
            .await
            // A busy or locked database, a full disk: worth another try.
            .map_err(|e| ClaimError::transient(&*self.label, e.to_string()))
    }

    /// Latest runs first, optionally for one instance, with their steps.
    pub fn history(&self, instance: Option<&str>, limit: usize) -> Result<Vec<RunRow>, StoreError> {
        let filter = HistoryFilter {
            instance: instance.map(str::to_string),
            ..HistoryFilter::default()
        };
        self.history_where(&filter, limit)
    }

    /// The newest `limit` runs that pass `filter`. The account and region are those of the
    /// source the run came through; a run recorded before the history kept them matches
    /// `--account` by the account its event names (the source's, else the message's) and
    /// no `--region`.
    pub fn history_where(
        &self,
        filter: &HistoryFilter,
        limit: usize,
    ) -> Result<Vec<RunRow>, StoreError> {
        let outcome = filter.outcome.map(Outcome::as_str);
        self.call_blocking(|c| {
            let mut stmt = c.prepare(
                "SELECT id, message_id, received_at, finished_at, instance_id, group_name, hook, transition, layer, outcome, hook_result, heartbeats, error, decision, cause, account, region
                 FROM runs WHERE (?1 IS NULL OR instance_id = ?1) AND (?3 IS NULL OR group_name = ?3)
                   AND (?4 IS NULL OR outcome = ?4)
                   AND (?5 IS NULL OR account = ?5 OR (account IS NULL AND json_valid(event)
                     AND COALESCE(json_extract(event, '$.source.account'), json_extract(event, '$.account_id')) = ?5))
                   AND (?6 IS NULL OR region = ?6)
                 ORDER BY id DESC LIMIT ?2",
            )?;
            let args = params![
                filter.instance,
                limit as i64,
                filter.group,
                outcome,
                filter.account,
                filter.region
            ];
            let mut runs: Vec<RunRow> = stmt
                .query_map(args, |r| {
                    Ok(RunRow {
                        id: r.get(0)?,
                        message_id: r.get(1)?,
                        received_at: r.get(2)?,
                        finished_at: r.get(3)?,
                        instance_id: r.get(4)?,
                        group: r.get(5)?,
                        hook: r.get(6)?,
                        transition: r.get(7)?,
                        layer: r.get(8)?,
                        account: r.get(15)?,
                        region: r.get(16)?,
                        // A word this version does not know (a newer release wrote
                        // it) reads as a run that has not ended.
                        outcome: word(r.get(9)?, Outcome::parse).unwrap_or_default(),
                        hook_result: word(r.get(10)?, Completion::parse),
                        heartbeats: r.get(11)?,
                        error: r.get(12)?,
                        decision: word(r.get(13)?, HookResult::parse),
                        cause: r.get(14)?,
                        steps: Vec::new(),
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut steps = c.prepare(
                "SELECT idx, kind, description, started_at, finished_at, outcome, detail FROM steps WHERE run_id = ?1 ORDER BY idx",
            )?;
            for run in &mut runs {
                run.steps = steps
                    .query_map([run.id], |r| {
                        Ok(StepRow {
                            idx: r.get(0)?,
                            kind: r.get(1)?,
                            description: r.get(2)?,
                            started_at: r.get(3)?,
                            finished_at: r.get(4)?,
                            outcome: r.get(5)?,
                            detail: r.get(6)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
            }
            Ok(runs)
        })
    }
}

/// A stored word read back as its type; None when absent or unknown.
fn word<T>(stored: Option<String>, parse: impl Fn(&str) -> Option<T>) -> Option<T> {
    stored.as_deref().and_then(parse)
}

/// Claims for a single host: the `actions` table, next to the history.
#[async_trait::async_trait]
impl Claims for Store {
    async fn claim(
        &self,
        token: &str,
        owner: &str,
        run_id: i64,
        lease: Duration,
    ) -> Result<Claim, ClaimError> {
        let (token, owner) = (token.to_string(), owner.to_string());
        self.claim_call(move |c| {
            let tx = c.unchecked_transaction()?;
            let now = now_ms();
            let claim = claims::judge(Self::claim_row(&tx, &token)?.as_ref(), &owner, now);
            if matches!(claim, Claim::Fresh { .. } | Claim::Decided(_)) {
                tx.execute(
                    "INSERT INTO actions (token, state, owner, run_id, updated_at, lease_until)
                     VALUES (?1, 'running', ?2, ?3, ?4, ?5)
                     ON CONFLICT(token) DO UPDATE SET owner = ?2, run_id = ?3, updated_at = ?4,
                       lease_until = ?5,
                       state = CASE WHEN state = 'decided' THEN 'decided' ELSE 'running' END",
                    params![token, owner, run_id, now, now + lease.as_millis() as i64],
                )?;
            }
            tx.commit()?;
            Ok(claim)
        })
        .await
    }

    async fn peek(&self, token: &str, owner: &str) -> Result<Claim, ClaimError> {
        let (token, owner) = (token.to_string(), owner.to_string());
        self.claim_call(move |c| {
            Ok(claims::judge(
                Self::claim_row(c, &token)?.as_ref(),
                &owner,
                now_ms(),
            ))
        })
        .await
    }

    async fn renew(&self, token: &str, owner: &str, lease: Duration) -> Result<bool, ClaimError> {
        let (token, owner) = (token.to_string(), owner.to_string());
        self.claim_call(move |c| {
            let now = now_ms();
            c.execute(
                "UPDATE actions SET lease_until = ?3, updated_at = ?4
                 WHERE token = ?1 AND owner = ?2 AND state <> 'done'",
                params![token, owner, now + lease.as_millis() as i64, now],
            )
            .map(|n| n == 1)
        })
        .await
    }

    async fn decide(
        &self,
        token: &str,
        owner: &str,
        result: HookResult,
    ) -> Result<bool, ClaimError> {
        let (token, owner) = (token.to_string(), owner.to_string());
        self.claim_call(move |c| {
            c.execute(
                "UPDATE actions SET state = 'decided', result = ?3, updated_at = ?4
                 WHERE token = ?1 AND owner = ?2 AND state <> 'done'",
                params![token, owner, result.as_str(), now_ms()],
            )
            .map(|n| n == 1)
        })
        .await
    }

    async fn done(&self, token: &str, owner: &str, result: Completion) -> Result<bool, ClaimError> {
        let (token, owner, result) = (token.to_string(), owner.to_string(), result.as_str());
        self.claim_call(move |c| {
            c.execute(
                "UPDATE actions SET state = 'done', result = ?3, updated_at = ?4
                 WHERE token = ?1 AND owner = ?2 AND state <> 'done'",
                params![token, owner, result, now_ms()],
            )
            .map(|n| n == 1)
        })
        .await
    }

    async fn release(&self, token: &str, owner: &str) -> Result<(), ClaimError> {
        let (token, owner) = (token.to_string(), owner.to_string());
        self.claim_call(move |c| {
            c.execute(
                "DELETE FROM actions WHERE token = ?1 AND owner = ?2 AND state = 'running'",
                [token, owner],
            )
            .map(|_| ())
        })
        .await
    }

    fn describe(&self) -> String {
        self.label.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<'a>(token: &'a str) -> NewRun<'a> {
        NewRun {
            token: Some(token),
            instance_id: Some("i-12345678"),
            outcome: Outcome::Running,
            ..Default::default()
        }
    }

    const LEASE: Duration = Duration::from_secs(60);

    /// Ends `run_id` succeeded, its result event `unpublished` (its publish failed) or not.
    async fn succeeded(s: &Store, run_id: i64, unpublished: Option<&str>) {
        let end = RunEnd {
            outcome: Outcome::Succeeded,
            unpublished,
            ..Default::default()
        };
        s.finish_run(run_id, end).await.unwrap();
    }

    fn fresh() -> Claim {
        Claim::Fresh { from: None }
    }

    #[tokio::test]
    async fn rows_of_unworked_messages_are_capped_and_worked_runs_kept() {
        let s = Store::in_memory().unwrap();
        let worked = s.insert_run(run("t-worked")).await.unwrap();
        for i in 0..30 {
            let junk = NewRun {
                outcome: if i % 2 == 0 {
                    Outcome::Rejected
                } else {
                    Outcome::Skipped
                },
                error: Some("junk"),
                ..Default::default()
            };
            s.insert_run(junk).await.unwrap();
        }
        let removed = s.prune(Duration::from_secs(3600), 10).await.unwrap();
        assert_eq!(removed, 20);
        let left = s.history(None, 100).unwrap();
        assert_eq!(left.len(), 11, "{left:?}");
        assert!(left.iter().any(|r| r.id == worked), "the worked run stays");
        // The newest junk stays.
        assert!(left.iter().all(|r| r.id == worked || r.id > 21), "{left:?}");
    }

    #[tokio::test]
    async fn claims_are_idempotent() {
        let s = Store::in_memory().unwrap();
        let r1 = s.insert_run(run("t1")).await.unwrap();
        assert_eq!(s.claim("t1", "a", r1, LEASE).await.unwrap(), fresh());
        // Held by a live owner: nobody else may work it.
        assert!(matches!(
            s.claim("t1", "b", r1, LEASE).await.unwrap(),
            Claim::Held { owner, .. } if owner == "a"
        ));
        assert!(s.decide("t1", "a", HookResult::Abandon).await.unwrap());
        assert_eq!(
            s.claim("t1", "a", r1, LEASE).await.unwrap(),
            Claim::Decided(HookResult::Abandon)
        );
        let done = Completion::Completed(HookResult::Abandon);
        assert!(
            !s.done("t1", "b", done).await.unwrap(),
            "only its owner ends it"
        );
        assert!(s.done("t1", "a", done).await.unwrap());
        assert_eq!(
            s.claim("t1", "d", r1, LEASE).await.unwrap(),
            Claim::Done {
                run_id: Some(r1),
                result: Some(Completion::Completed(HookResult::Abandon))
            }
        );
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_its_owner_cannot_renew_or_decide() {
        let s = Store::in_memory().unwrap();
        let r1 = s.insert_run(run("t3")).await.unwrap();
        assert_eq!(s.claim("t3", "a", r1, LEASE).await.unwrap(), fresh());
        assert!(s.renew("t3", "a", Duration::ZERO).await.unwrap());
        assert_eq!(
            s.claim("t3", "b", r1, LEASE).await.unwrap(),
            Claim::Fresh {
                from: Some("a".into())
            }
        );
        assert!(!s.renew("t3", "a", LEASE).await.unwrap());
        assert!(!s.decide("t3", "a", HookResult::Continue).await.unwrap());
        assert!(s.decide("t3", "b", HookResult::Continue).await.unwrap());
        let done = Completion::Completed(HookResult::Continue);
        assert!(!s.done("t3", "a", done).await.unwrap(), "fenced: a lost it");
        assert_eq!(
            s.peek("t3", "b").await.unwrap(),
            Claim::Decided(HookResult::Continue)
        );
    }

    #[tokio::test]
    async fn released_claims_start_over() {
        let s = Store::in_memory().unwrap();
        let r1 = s.insert_run(run("t2")).await.unwrap();
        s.claim("t2", "a", r1, LEASE).await.unwrap();
        s.release("t2", "b").await.unwrap();
        assert!(matches!(
            s.peek("t2", "c").await.unwrap(),
            Claim::Held { .. }
        ));
        s.release("t2", "a").await.unwrap();
        assert_eq!(s.claim("t2", "c", r1, LEASE).await.unwrap(), fresh());
    }

    #[tokio::test]
    async fn a_result_staged_by_a_run_under_way_is_its_own_to_publish_until_it_ends() {
        let s = Store::in_memory().unwrap();
        let r1 = s.insert_run(run("t6")).await.unwrap();
        s.stage_result(r1, r#"{"a":1}"#).await.unwrap();
        assert!(
            s.unpublished(10).await.unwrap().is_empty(),
            "its run is publishing it"
        );
        // Another process (after a crash) sees it: the staging is this process's.
        let other = Store {
            staged: Arc::default(),
            ..s.clone()
        };
        assert_eq!(other.unpublished(10).await.unwrap().len(), 1);
        let body = r#"{"a":2}"#;
        succeeded(&s, r1, Some(body)).await;
        assert_eq!(
            s.unpublished(10).await.unwrap(),
            vec![(r1, body.to_string())],
            "its publish failed: the outbox's now"
        );
    }

    #[tokio::test]
    async fn unpublished_results_wait_in_the_outbox() {
        let s = Store::in_memory().unwrap();
        let r1 = s.insert_run(run("t4")).await.unwrap();
        let r2 = s.insert_run(run("t5")).await.unwrap();
        let body = r#"{"a":1}"#;
        succeeded(&s, r1, Some(body)).await;
        succeeded(&s, r2, None).await;
        assert_eq!(
            s.unpublished(10).await.unwrap(),
            vec![(r1, body.to_string())]
        );
        s.mark_published(r1).await.unwrap();
        assert!(s.unpublished(10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn history_filters_by_the_account_and_region_of_each_runs_source() {
        let s = Store::in_memory().unwrap();
        let at = |token, account, region| NewRun {
            account,
            region,
            ..run(token)
        };
        let ops = s
            .insert_run(at("t-ops", Some("123456789012"), Some("us-east-1")))
            .await
            .unwrap();
        let member = s
            .insert_run(at("t-eu", Some("210987654321"), Some("eu-west-1")))
            .await
            .unwrap();
        // A row from before the history kept the source: only its event names the account.
        let old = s
            .insert_run(NewRun {
                event: Some(r#"{"account_id":"210987654321"}"#),
                ..run("t-old")
            })
            .await
            .unwrap();
        let ids = |f: HistoryFilter| -> Vec<i64> {
            s.history_where(&f, 10)
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect()
        };
        let region = |r: &str| HistoryFilter {
            region: Some(r.into()),
            ..HistoryFilter::default()
        };
        let account = |a: &str| HistoryFilter {
            account: Some(a.into()),
            ..HistoryFilter::default()
        };
        assert_eq!(ids(region("eu-west-1")), [member]);
        assert_eq!(ids(region("us-east-1")), [ops]);
        assert!(ids(region("ap-south-1")).is_empty());
        assert_eq!(ids(account("210987654321")), [old, member]);
        assert_eq!(ids(account("123456789012")), [ops]);
        assert_eq!(
            ids(HistoryFilter {
                region: Some("eu-west-1".into()),
                ..account("123456789012")
            }),
            Vec::<i64>::new(),
            "every given field must match"
        );
        let rows = s.history(None, 10).unwrap();
        let eu = rows.iter().find(|r| r.id == member).unwrap();
        assert_eq!(
            (eu.account.as_deref(), eu.region.as_deref()),
            (Some("210987654321"), Some("eu-west-1"))
        );
        let before = rows.iter().find(|r| r.id == old).unwrap();
        assert_eq!(
            (before.account.as_deref(), before.region.as_deref()),
            (None, None)
        );
    }

    #[tokio::test]
    async fn history_lists_runs_with_steps() {
        let s = Store::in_memory().unwrap();
        let r1 = s.insert_run(run("t3")).await.unwrap();
        s.start_step(r1, 0, "tag", "tag Name=x").await.unwrap();
        s.finish_step(r1, 0, StepOutcome::Succeeded, "tagged")
            .await
            .unwrap();
        s.finish_run(
            r1,
            RunEnd {
                outcome: Outcome::Succeeded,
                hook_result: Some(Completion::Completed(HookResult::Continue)),
                heartbeats: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let h = s.history(Some("i-12345678"), 10).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(
            h[0].hook_result,
            Some(Completion::Completed(HookResult::Continue))
        );
        assert_eq!(h[0].heartbeats, 2);
        assert_eq!(h[0].steps[0].outcome, "succeeded");
        assert!(s.history(Some("i-99999999"), 10).unwrap().is_empty());
    }
}

//! Claims on lifecycle actions: which process works a token, and what became of it.
//!
//! Owns the claim protocol that makes at-least-once delivery harmless across processes and
//! hosts. A token's claim is `running` (an owner works its steps, holding a lease it renews),
//! `decided` (the steps are over and their result recorded: only the completion is left, for
//! anyone) or `done` (completed: every later delivery is acknowledged without work). Another
//! owner takes a `running` or `decided` claim over only once its lease expired: its owner is
//! then gone (killed, its host lost), since a live one renews every third of the lease.
//!
//! Two stores keep claims: the SQLite state store for a single host (`store.rs`, the default)
//! and a DynamoDB table shared by a fleet of ops hosts and by Lambda's concurrent execution
//! environments (`aws/dynamo.rs`). Both implement [`Claims`]; the pipeline's `claim.rs` uses
//! it and knows neither.

use std::time::Duration;

use async_trait::async_trait;

use crate::outcome::{Completion, HookResult};

/// A claim's lease unless `state.claim_lease` says otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// The shortest lease: renewed every third of it, a renewal must fit in a few seconds.
pub const MIN_LEASE: Duration = Duration::from_secs(3);

/// What claiming (or looking at) a lifecycle action's token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Ours to work: new, or taken over from an owner whose lease expired (`from`).
    Fresh { from: Option<String> },
    /// Steps already ran (here, or by an owner that is gone); only completion is left.
    Decided(HookResult),
    /// Completed before: acknowledge the message, do nothing else.
    Done {
        run_id: Option<i64>,
        result: Option<Completion>,
    },
    /// Another owner holds it, its lease running until `until_ms` (ms since the epoch).
    Held { owner: String, until_ms: i64 },
}

#[derive(Debug, thiserror::Error)]
#[error("claims ({store}): {message}")]
pub struct ClaimError {
    /// Which store: "state store", "DynamoDB table provision-claims".
    pub store: String,
    pub message: String,
    /// Worth trying again (throttled, a 5xx, the connection, a busy database): the message
    /// waits in flight meanwhile. Else the store refuses for good (no such table, access
    /// denied) and the message goes back with the reason.
    pub transient: bool,
}

impl ClaimError {
    /// A refusal that trying again will not change.
    pub fn new(store: impl Into<String>, message: impl Into<String>) -> ClaimError {
        ClaimError {
            store: store.into(),
            message: message.into(),
            transient: false,
        }
    }

    /// A failure that may pass.
    pub fn transient(store: impl Into<String>, message: impl Into<String>) -> ClaimError {
        ClaimError {
            transient: true,
            ..ClaimError::new(store, message)
        }
    }
}

/// Where claims are kept. Every call is one small write or read.
#[async_trait]
pub trait Claims: Send + Sync {
    /// Claims `token` for `owner` until `lease` from now. A claim held by another owner whose
    /// lease has not expired answers [`Claim::Held`] and changes nothing.
    async fn claim(
        &self,
        token: &str,
        owner: &str,
        run_id: i64,
        lease: Duration,
    ) -> Result<Claim, ClaimError>;

    /// What a claim would find, without writing: `Fresh` when it would succeed.
    async fn peek(&self, token: &str, owner: &str) -> Result<Claim, ClaimError>;

    /// Extends `owner`'s lease. False: the claim is no longer ours (taken over, or done).
    async fn renew(&self, token: &str, owner: &str, lease: Duration) -> Result<bool, ClaimError>;

    /// The steps finished with `result`; only the completion is left. Recorded before
    /// completing, so that whoever finds the claim next only completes. False, and nothing
    /// written, when the claim is no longer `owner`'s: the owner is the fencing value, since
    /// a takeover writes its own (unique per process) and a done claim is nobody's.
    async fn decide(
        &self,
        token: &str,
        owner: &str,
        result: HookResult,
    ) -> Result<bool, ClaimError>;

    /// The action is finished for good (completed, or found already finished). Like
    /// [`Claims::decide`], only while the claim is `owner`'s: false, and nothing written,
    /// when another owner took it over meanwhile.
    async fn done(&self, token: &str, owner: &str, result: Completion) -> Result<bool, ClaimError>;

    /// Forgets `owner`'s running claim (work abandoned midway), so the next delivery starts
    /// over at once instead of waiting out the lease.
    async fn release(&self, token: &str, owner: &str) -> Result<(), ClaimError>;

    /// The store, for logs and `check`: "state store /var/lib/...", "DynamoDB table ...".
    fn describe(&self) -> String;
}

/// One source's view of claims shared by several (`[sources.NAME]`): each key (a token,
/// an action key naming an instance) is kept under its account and region,
/// `ACCOUNT/REGION/KEY`, so that the sources of one claims table never meet on a key that
/// only looks alike. The `[queue]` source keeps the bare keys it always had.
pub struct Scoped {
    inner: std::sync::Arc<dyn Claims>,
    prefix: String,
}

impl Scoped {
    pub fn new(inner: std::sync::Arc<dyn Claims>, account: &str, region: &str) -> Scoped {
        Scoped {
            inner,
            prefix: format!("{account}/{region}/"),
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }
}

#[async_trait]
impl Claims for Scoped {
    async fn claim(
        &self,
        token: &str,
        owner: &str,
        run_id: i64,
        lease: Duration,
    ) -> Result<Claim, ClaimError> {
        self.inner
            .claim(&self.key(token), owner, run_id, lease)
            .await
    }

    async fn peek(&self, token: &str, owner: &str) -> Result<Claim, ClaimError> {
        self.inner.peek(&self.key(token), owner).await
    }

    async fn renew(&self, token: &str, owner: &str, lease: Duration) -> Result<bool, ClaimError> {
        self.inner.renew(&self.key(token), owner, lease).await
    }

    async fn decide(
        &self,
        token: &str,
        owner: &str,
        result: HookResult,
    ) -> Result<bool, ClaimError> {
        self.inner.decide(&self.key(token), owner, result).await
    }

    async fn done(&self, token: &str, owner: &str, result: Completion) -> Result<bool, ClaimError> {
        self.inner.done(&self.key(token), owner, result).await
    }

    async fn release(&self, token: &str, owner: &str) -> Result<(), ClaimError> {
        self.inner.release(&self.key(token), owner).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// This process's owner name in claims: `host:pid:random` (random: a pid is reused).
pub fn owner_id(host: &str) -> String {
    format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..))
}

/// This machine's host name, read once.
pub fn hostname() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    })
}

/// Whether `owner` names a process of this host that no longer exists. A store only this
/// host uses (SQLite) treats such a claim as expired: a daemon restarted after a crash takes
/// its predecessor's claims over at once instead of waiting out their leases. A shared
/// store cannot know about other hosts' processes and waits.
pub fn gone_from_this_host(owner: &str) -> bool {
    let mut parts = owner.rsplitn(3, ':');
    let (_random, pid, host) = (parts.next(), parts.next(), parts.next());
    match (host, pid.and_then(|p| p.parse::<u32>().ok())) {
        (Some(h), Some(pid)) if h == hostname() && pid != 0 => !process_exists(pid),
        _ => false,
    }
}

/// Whether a process with this pid exists on this host. Asked with signal 0, not by
/// looking in `/proc`: under the unit's `ProtectProc=invisible`, another user's processes
/// (a `provision worker` an operator runs) are hidden there, though alive. EPERM means it
/// exists but is not ours to signal.
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 sends nothing; it only checks that the pid exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether `name` is a valid DynamoDB table name.
pub fn valid_table_name(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// What a stored claim row means to `owner` at `now_ms`: the one rule both stores apply.
pub fn judge(row: Option<&Row>, owner: &str, now_ms: i64) -> Claim {
    let Some(row) = row else {
        return Claim::Fresh { from: None };
    };
    match row.state {
        ClaimState::Done => Claim::Done {
            run_id: row.run_id,
            result: row.result,
        },
        _ if row.owner != owner && row.lease_until_ms > now_ms => Claim::Held {
            owner: row.owner.clone(),
            until_ms: row.lease_until_ms,
        },
        ClaimState::Decided => Claim::Decided(row.decision()),
        ClaimState::Running => Claim::Fresh {
            from: (row.owner != owner).then(|| row.owner.clone()),
        },
    }
}

/// Where a claim stands: its stored `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimState {
    Running,
    Decided,
    Done,
}

impl ClaimState {
    /// A stored word; one this version does not know reads as running (an owner works it,
    /// and it is taken over once its lease lapses).
    pub fn parse(s: &str) -> ClaimState {
        match s {
            "decided" => ClaimState::Decided,
            "done" => ClaimState::Done,
            _ => ClaimState::Running,
        }
    }
}

/// A claim as stored, its words read by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub state: ClaimState,
    pub owner: String,
    /// 0 for claims written before leases (taken over at once).
    pub lease_until_ms: i64,
    pub run_id: Option<i64>,
    /// Decided: the result the steps came to; done: what completing came to.
    pub result: Option<Completion>,
}

impl Row {
    /// The result a decided claim is to be completed with (ABANDON when none was kept).
    pub fn decision(&self) -> HookResult {
        match self.result {
            Some(Completion::Completed(r)) => r,
            _ => HookResult::Abandon,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: &str, owner: &str, until: i64) -> Row {
        let state = ClaimState::parse(state);
        Row {
            state,
            owner: owner.into(),
            lease_until_ms: until,
            run_id: Some(7),
            result: (state != ClaimState::Running)
                .then_some(Completion::Completed(HookResult::Continue)),
        }
    }

    #[test]
    fn a_live_lease_of_another_owner_holds_and_an_expired_one_is_taken_over() {
        let now = 1_000;
        assert_eq!(judge(None, "me", now), Claim::Fresh { from: None });
        assert_eq!(
            judge(Some(&row("running", "other", now + 1)), "me", now),
            Claim::Held {
                owner: "other".into(),
                until_ms: now + 1
            }
        );
        assert_eq!(
            judge(Some(&row("running", "other", now)), "me", now),
            Claim::Fresh {
                from: Some("other".into())
            }
        );
        assert_eq!(
            judge(Some(&row("running", "me", now + 50)), "me", now),
            Claim::Fresh { from: None }
        );
    }

    #[test]
    fn a_decision_is_completed_by_whoever_finds_it_free_and_done_is_final() {
        let now = 1_000;
        assert_eq!(
            judge(Some(&row("decided", "other", now - 1)), "me", now),
            Claim::Decided(HookResult::Continue)
        );
        assert!(matches!(
            judge(Some(&row("decided", "other", now + 5)), "me", now),
            Claim::Held { .. }
        ));
        assert_eq!(
            judge(Some(&row("done", "other", now + 5)), "me", now),
            Claim::Done {
                run_id: Some(7),
                result: Some(Completion::Completed(HookResult::Continue))
            }
        );
    }

    #[test]
    fn a_live_process_of_another_user_is_not_gone() {
        assert!(process_exists(std::process::id()));
        assert!(!process_exists(u32::MAX));
        // Root may signal any pid, so EPERM never shows to it: the probe is asked from a
        // child that runs as another user (nobody) about this process, with /proc hiding
        // other users' processes as the unit's ProtectProc=invisible does.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(probe_as_nobody(), 0, "{}", PROBE_FAILURES);
        } else {
            // pid 1 is root's: signalling it answers EPERM, alive all the same.
            assert!(process_exists(1));
        }
    }

    const PROBE_FAILURES: &str = "exit 2: could not become nobody; 3: signalling the parent \
        did not answer EPERM (the probe would prove nothing); 4: the parent, alive, was \
        judged gone; 5: no private /proc with hidepid=invisible; 6: /proc still shows the \
        parent";

    /// Forks a child that mounts a /proc hiding other users' processes, becomes nobody,
    /// and judges whether this (root's, live) process is gone. Its exit status: 0 when it
    /// is judged alive, else the reason ([`PROBE_FAILURES`]).
    fn probe_as_nobody() -> i32 {
        let parent = std::process::id();
        // Made before the fork (this process's owner id): the child only makes system
        // calls, no allocation.
        let owner = owner_id(hostname());
        let proc_dir = std::ffi::CString::new(format!("/proc/{parent}")).unwrap();
        // SAFETY: the child makes only async-signal-safe calls and leaves with _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: see above; every pointer is a valid NUL-terminated string.
            unsafe {
                let private = libc::unshare(libc::CLONE_NEWNS) == 0
                    && libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) == 0
                    && libc::mount(
                        c"proc".as_ptr(),
                        c"/proc".as_ptr(),
                        c"proc".as_ptr(),
                        0,
                        c"hidepid=invisible".as_ptr().cast(),
                    ) == 0;
                if !private {
                    libc::_exit(5);
                }
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    libc::_exit(2);
                }
                if libc::access(proc_dir.as_ptr(), libc::F_OK) == 0 {
                    libc::_exit(6);
                }
                let eperm = libc::kill(parent as libc::pid_t, 0) == -1
                    && *libc::__errno_location() == libc::EPERM;
                if !eperm {
                    libc::_exit(3);
                }
                libc::_exit(if gone_from_this_host(&owner) { 4 } else { 0 });
            }
        }
        assert!(child > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        let waited = unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(waited, child);
        assert!(libc::WIFEXITED(status), "the probe died: {status}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn only_a_process_of_this_host_that_is_gone_counts_as_gone() {
        let me = owner_id(hostname());
        assert!(!gone_from_this_host(&me));
        // pid_max is at most 2^22: this pid cannot exist.
        let dead = format!("{}:{}:0000abcd", hostname(), 1u32 << 23);
        assert!(gone_from_this_host(&dead));
        assert!(!gone_from_this_host("other-host:4194305:0000abcd"));
        assert!(!gone_from_this_host("garbage"));
    }

    #[test]
    fn table_names_follow_dynamodb_rules() {
        assert!(valid_table_name("provision-claims"));
        assert!(valid_table_name("a.b_c"));
        assert!(!valid_table_name("ab"));
        assert!(!valid_table_name("has space"));
        assert!(!valid_table_name(&"x".repeat(256)));
    }
}

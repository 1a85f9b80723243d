//! Claiming a lifecycle action before working it, and holding the claim while it runs.
//!
//! Two claims, one inside the other: in this process, the same token is worked by one task
//! at a time (a second delivery waits for the first, then finds it done); in the claim store
//! ([`crate::claims`]: SQLite for one host, DynamoDB for a fleet) the token's claim says
//! whether the action is new, decided (steps ran, completion left) or done, and who holds it.
//! A delivery whose token another live owner holds waits for it the same way, its message
//! kept hidden: it is not released to come back (that would spend the queue's receive count),
//! and not deleted (the holder may die, and its copy may be this very message). The holder
//! renews its lease every third of `state.claim_lease` ([`Keeper`]); a claim that was taken
//! over cancels the steps. Owns neither the steps nor the completion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Job, Pipeline, RunReport};
use crate::claims::{Claim, ClaimError, Claims};
use crate::clock::now_ms;
use crate::layer::Layer;

/// Tokens being worked in this process; a second delivery of one waits on it.
#[derive(Default)]
pub(super) struct Working(Mutex<HashMap<String, watch::Receiver<bool>>>);

impl Working {
    /// Waits until no other task of this process works `token`, then marks it worked until
    /// the guard is dropped. None when cancelled while waiting.
    pub(super) async fn enter<'a>(
        &'a self,
        token: &'a str,
        cancel: &CancellationToken,
    ) -> Option<WorkingGuard<'a>> {
        loop {
            let mut busy = {
                let mut working = self.0.lock().unwrap();
                match working.get(token) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(false);
                        working.insert(token.to_string(), rx);
                        return Some(WorkingGuard {
                            working: self,
                            token,
                            tx,
                        });
                    }
                }
            };
            info!("same lifecycle action is being worked on here; waiting for it");
            tokio::select! {
                _ = busy.wait_for(|done| *done) => {}
                _ = cancel.cancelled() => return None,
            }
        }
    }
}

/// Removes a token from the in-process map and wakes anyone waiting for it.
pub(super) struct WorkingGuard<'a> {
    working: &'a Working,
    token: &'a str,
    tx: watch::Sender<bool>,
}

impl Drop for WorkingGuard<'_> {
    fn drop(&mut self) {
        self.working.0.lock().unwrap().remove(self.token);
        let _ = self.tx.send(true);
    }
}

/// Renews a claim's lease while its run holds it; cancels `lost` when another owner has
/// taken it over. Stops when dropped.
pub(super) struct Keeper {
    task: JoinHandle<()>,
}

impl Keeper {
    fn spawn(
        claims: Arc<dyn Claims>,
        token: String,
        owner: String,
        lease: Duration,
        lost: CancellationToken,
    ) -> Keeper {
        let fire = lost;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                match claims.renew(&token, &owner, lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!("the claim on this lifecycle action was taken over by another owner (its lease had expired); stopping the steps");
                        fire.cancel();
                        return;
                    }
                    Err(e) => warn!(error = %e, "could not renew the claim's lease; trying again"),
                }
            }
        });
        Keeper { task }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often a delivery waiting on another owner's claim looks again.
fn poll_every(lease: Duration) -> Duration {
    (lease / 6).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

impl Pipeline {
    /// Records the run's first row, then claims its token: Fresh, Decided or Done, after
    /// waiting while another live owner holds it. None when cancelled while waiting.
    pub(super) async fn claim(
        &self,
        job: &Job,
        layer: &Layer,
        run: &mut RunReport,
        cancel: &CancellationToken,
    ) -> Result<Option<(i64, Claim)>, ClaimError> {
        let run_id = self
            .open_run(job, Some(&layer.name))
            .await
            .map_err(|e| ClaimError::new("state store", e.to_string()))?;
        run.run_id = Some(run_id);
        let token = &job.event.token;
        let lease = self.cfg.state.claim_lease;
        let claim_it = || self.claims.claim(token, &self.owner, run_id, lease);
        let Some(mut claim) = self.in_flight(cancel, claim_it).await? else {
            return Ok(None);
        };
        while let Claim::Held { owner, until_ms } = &claim {
            info!(holder = %owner, lease_left_ms = until_ms - now_ms(),
                "another owner works this lifecycle action; waiting for it to finish or its lease to expire");
            let mut peeked = claim.clone();
            while matches!(peeked, Claim::Held { .. }) {
                tokio::select! {
                    _ = tokio::time::sleep(poll_every(lease)) => {}
                    _ = cancel.cancelled() => return Ok(None),
                }
                let peek = || self.claims.peek(token, &self.owner);
                let Some(p) = self.in_flight(cancel, peek).await? else {
                    return Ok(None);
                };
                peeked = p;
            }
            claim = match peeked {
                done @ Claim::Done { .. } => done,
                _ => match self.in_flight(cancel, claim_it).await? {
                    Some(c) => c,
                    None => return Ok(None),
                },
            };
        }
        if let Claim::Fresh {
            from: Some(previous),
        } = &claim
        {
            warn!(%previous, "took over a claim whose lease expired (its owner stopped renewing it)");
            run.note = Some(format!(
                "took over the claim of {previous}, whose lease had expired"
            ));
        }
        Ok(Some((run_id, claim)))
    }

    /// A claim-store call, tried again with growing pauses while it fails for a transient
    /// reason: the message waits in flight meanwhile rather than going back to spend a
    /// receive. None when `cancel` fires first; a permanent error as it is.
    async fn in_flight<T, F, Fut>(
        &self,
        cancel: &CancellationToken,
        mut call: F,
    ) -> Result<Option<T>, ClaimError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClaimError>>,
    {
        let mut round = 0;
        loop {
            let e = match call().await {
                Ok(v) => return Ok(Some(v)),
                Err(e) if !e.transient => return Err(e),
                Err(e) => e,
            };
            round += 1;
            let delay = super::complete::round_delay(round, self.cfg.aws.retry_for);
            warn!(error = %e, round, next_in = ?delay,
                "the claim store fails for a transient reason; the message stays in flight");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return Ok(None),
            }
        }
    }

    /// Holds a won claim until the returned keeper is dropped; `lost` fires if another
    /// owner takes it over meanwhile.
    pub(super) fn keep(&self, job: &Job, lost: CancellationToken) -> Keeper {
        Keeper::spawn(
            self.claims.clone(),
            job.event.token.clone(),
            self.owner.clone(),
            self.cfg.state.claim_lease,
            lost,
        )
    }
}

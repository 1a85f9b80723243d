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
//! over stops the steps. Owns neither the steps nor the completion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::run::{End, Run};
use crate::claims::{Claim, ClaimError, Claims};
use crate::clock::now_ms;
use crate::layer::Layer;
use crate::retry::{in_flight_rounds, Retry};

/// Tokens being worked in this process; a second delivery of one waits on it.
#[derive(Default)]
pub(super) struct Working(Mutex<HashMap<String, watch::Receiver<bool>>>);

impl Working {
    /// Waits until no other task of this process works `token`, then marks it worked until
    /// the guard is dropped. None when cancelled while waiting.
    pub(super) async fn enter(
        &self,
        token: &str,
        cancel: &CancellationToken,
    ) -> Option<WorkingGuard<'_>> {
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
                            token: token.to_string(),
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
    token: String,
    tx: watch::Sender<bool>,
}

impl Drop for WorkingGuard<'_> {
    fn drop(&mut self) {
        self.working.0.lock().unwrap().remove(&self.token);
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

impl<'a> Run<'a> {
    /// Waits until no other task of this process works the run's token.
    pub(super) async fn wait_turn(&self) -> Result<WorkingGuard<'a>, End> {
        let token = &self.job.event.token;
        self.p
            .working
            .enter(token, self.cancel)
            .await
            .ok_or(End::Cancelled)
    }

    /// Records the run's first row, then claims its token, waiting while another live
    /// owner holds it: `Fresh` or `Decided` (a `Done` token ends the run as a duplicate).
    pub(super) async fn claim(&mut self, layer: &Layer) -> Result<Claim, End> {
        let p = self.p;
        let run_id = p
            .open_run(&self.job, Some(&layer.name))
            .await
            .map_err(|e| End::ClaimStore(ClaimError::new("state store", e.to_string())))?;
        self.report.run_id = Some(run_id);
        let token = &self.job.event.token;
        let lease = p.cfg.state.claim_lease;
        let claim_it = || p.claims.claim(token, &p.owner, run_id, lease);
        let mut claim = self.in_flight(claim_it).await?;
        while let Claim::Held { owner, until_ms } = &claim {
            info!(holder = %owner, lease_left_ms = until_ms - now_ms(),
                "another owner works this lifecycle action; waiting for it to finish or its lease to expire");
            let mut peeked = claim.clone();
            while matches!(peeked, Claim::Held { .. }) {
                tokio::select! {
                    _ = tokio::time::sleep(poll_every(lease)) => {}
                    _ = self.cancel.cancelled() => return Err(End::Cancelled),
                }
                peeked = self.in_flight(|| p.claims.peek(token, &p.owner)).await?;
            }
            claim = match peeked {
                done @ Claim::Done { .. } => done,
                _ => self.in_flight(claim_it).await?,
            };
        }
        match claim {
            Claim::Done { result, .. } => {
                self.report.hook_result = result;
                return Err(End::Duplicate);
            }
            Claim::Fresh {
                from: Some(ref previous),
            } => {
                warn!(%previous, "took over a claim whose lease expired (its owner stopped renewing it)");
                self.report.note = Some(format!(
                    "took over the claim of {previous}, whose lease had expired"
                ));
            }
            _ => {}
        }
        self.claimed = true;
        Ok(claim)
    }

    /// A claim-store call, tried again with growing pauses while it fails for a transient
    /// reason: the message waits in flight meanwhile rather than going back to spend a
    /// receive.
    async fn in_flight<T, F, Fut>(&self, call: F) -> Result<T, End>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClaimError>>,
    {
        let rounds = in_flight_rounds(self.p.cfg.aws.retry_for);
        let says = "the claim store fails for a transient reason; the message stays in flight";
        match Retry::new(rounds, says).unless(self.cancel).run(call).await {
            Ok(v) => Ok(v),
            Err(_) if self.cancel.is_cancelled() => Err(End::Cancelled),
            Err(e) => Err(End::ClaimStore(e)),
        }
    }

    /// Holds the won claim until the returned keeper is dropped. The token fires when the
    /// run must stop: the source's cancellation, or another owner taking the claim over.
    pub(super) fn hold_claim(&self) -> (Keeper, CancellationToken) {
        let stop = self.cancel.child_token();
        let keeper = Keeper::spawn(
            self.p.claims.clone(),
            self.job.event.token.clone(),
            self.p.owner.clone(),
            self.p.cfg.state.claim_lease,
            stop.clone(),
        );
        (keeper, stop)
    }
}

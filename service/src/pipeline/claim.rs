//! Claiming a lifecycle action before working it, and holding the claim while it runs.
//!
//! Two claims, one inside the other: in this process, one instance is worked by one task at
//! a time (a second delivery waits for the first, then finds it done); in the claim store
//! ([`crate::claims`]: SQLite for one host, DynamoDB for a fleet) the token's claim says
//! whether the action is new, decided (steps ran, completion left) or done, and who holds it.
//! A delivery whose token another live owner holds waits for it the same way, its message
//! kept hidden: it is not released to come back (that would spend the queue's receive count),
//! and not deleted (the holder may die, and its copy may be this very message).
//!
//! **Fencing.** The holder renews its lease every third of `state.claim_lease` ([`Keeper`]),
//! each renewal bounded to a sixth of it (a failed one is tried again every twelfth). The
//! keeper stops the run's steps when the claim was taken over, and also *before the lease
//! could lapse unrenewed*: at three quarters of the lease after the last renewal that
//! succeeded (counted from before it was sent, on this host's monotonic clock). Another
//! owner takes over only once the lease is over by its own wall clock, so hosts whose
//! clocks differ by less than a quarter of the lease (15 s for the default minute, less the
//! moment it takes to stop a step) never act at once. The decision and `done` are written
//! only while the owner is still this process's (the owner id, unique per process, is the
//! fencing value a takeover replaces); a run that lost its claim completes nothing.
//! Owns neither the steps nor the completion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::run::{End, Run};
use crate::claims::{Claim, ClaimError, Claims};
use crate::clock::now_ms;
use crate::layer::Layer;
use crate::retry::{in_flight_rounds, Retry};

/// Instances being worked in this process; a second delivery for one waits on it.
#[derive(Default)]
pub(super) struct Working(Mutex<HashMap<String, watch::Receiver<bool>>>);

impl Working {
    /// Waits until no other task of this process works `key` (an instance), then marks it
    /// worked until the guard is dropped. None when cancelled while waiting.
    pub(super) async fn enter(
        &self,
        token: &str,
        cancel: &CancellationToken,
    ) -> Option<WorkingGuard<'_>> {
        let mut waited = false;
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
                            waited,
                        });
                    }
                }
            };
            info!("the same instance is being worked on here; waiting for that run");
            waited = true;
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
    /// Whether another run of the instance went first (it may have ended the action).
    pub(super) waited: bool,
}

impl Drop for WorkingGuard<'_> {
    fn drop(&mut self) {
        self.working.0.lock().unwrap().remove(&self.token);
        let _ = self.tx.send(true);
    }
}

/// Why a run's claim stopped being its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lost {
    /// Another owner took it over (this run's lease had expired).
    TakenOver,
    /// Renewals failed until the lease was about to lapse: the run stopped before anyone
    /// could take it over.
    Lapsed,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lost::TakenOver => "another owner took the claim over (this run's lease had expired)",
            Lost::Lapsed => "the claim's lease could not be renewed before it would lapse",
        })
    }
}

/// Renews a claim's lease while its run holds it; sets `lost` and cancels `stop` when the
/// claim was taken over, or before its lease could lapse unrenewed. Stops when dropped.
pub(super) struct Keeper {
    task: JoinHandle<()>,
}

/// The claim a keeper keeps.
pub(super) struct Held {
    pub(super) claims: Arc<dyn Claims>,
    pub(super) token: String,
    pub(super) owner: String,
    pub(super) lease: Duration,
    /// When the call that won (or last renewed) the claim was sent.
    pub(super) since: Instant,
}

impl Held {
    /// When this host stops acting on the claim unless renewed: a quarter of the lease
    /// before it ends, the margin for other hosts' clocks.
    fn stop_at(&self) -> Instant {
        self.since + self.lease - self.lease / 4
    }
}

impl Keeper {
    pub(super) fn spawn(
        mut held: Held,
        lost: Arc<OnceLock<Lost>>,
        stop: CancellationToken,
    ) -> Keeper {
        let task = tokio::spawn(async move {
            let fire = |why: Lost| {
                warn!(reason = %why, "stopping the steps: the claim on this lifecycle action is no longer ours");
                let _ = lost.set(why);
                stop.cancel();
            };
            let mut next = held.since + held.lease / 3;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(held.stop_at()) => return fire(Lost::Lapsed),
                    _ = tokio::time::sleep_until(next) => {}
                }
                let sent = Instant::now();
                let renewal = tokio::time::timeout(
                    held.lease / 6,
                    held.claims.renew(&held.token, &held.owner, held.lease),
                );
                let renewed = tokio::select! {
                    r = renewal => r,
                    _ = tokio::time::sleep_until(held.stop_at()) => return fire(Lost::Lapsed),
                };
                match renewed {
                    Ok(Ok(true)) => {
                        held.since = sent;
                        next = sent + held.lease / 3;
                    }
                    Ok(Ok(false)) => return fire(Lost::TakenOver),
                    Ok(Err(e)) => {
                        warn!(error = %e, "could not renew the claim's lease; trying again");
                        next = Instant::now() + held.lease / 12;
                    }
                    Err(_) => {
                        warn!(timeout = ?held.lease / 6, "renewing the claim's lease did not answer in time; trying again");
                        next = Instant::now() + held.lease / 12;
                    }
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
    /// Waits until no other task of this process works the run's instance.
    pub(super) async fn wait_turn(&self) -> Result<WorkingGuard<'a>, End> {
        let instance = self.job.event.instance_id.as_str();
        self.p
            .working
            .enter(instance, self.cancel)
            .await
            .ok_or(End::Cancelled)
    }

    /// Records the run's first row, then claims its token, waiting while another live
    /// owner holds it: `Fresh` or `Decided` (a `Done` token ends the run as a duplicate).
    pub(super) async fn claim(&mut self, layer: &Layer) -> Result<Claim, End> {
        let p = self.p;
        // A history row that cannot be written (a busy database, a full disk) is what a
        // claim the state store cannot write is: transient, waited out in flight.
        let open = || async {
            p.open_run(&self.job, Some(&layer.name))
                .await
                .map_err(|e| ClaimError::transient("state store", e.to_string()))
        };
        let run_id = self.in_flight(open).await?;
        self.report.run_id = Some(run_id);
        let token = &self.job.event.token;
        let lease = p.cfg.state.claim_lease;
        let sent = Mutex::new(Instant::now());
        let claim_it = || {
            *sent.lock().unwrap() = Instant::now();
            p.claims.claim(token, &p.owner, run_id, lease)
        };
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
        self.claimed_at = Some(*sent.lock().unwrap());
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
    /// run must stop: the source's cancellation, or the claim no longer ours.
    pub(super) fn hold_claim(&self) -> (Keeper, CancellationToken) {
        let stop = self.cancel.child_token();
        let held = Held {
            claims: self.p.claims.clone(),
            token: self.job.event.token.clone(),
            owner: self.p.owner.clone(),
            lease: self.p.cfg.state.claim_lease,
            since: self.claimed_at.unwrap_or_else(Instant::now),
        };
        let keeper = Keeper::spawn(held, self.lost.clone(), stop.clone());
        (keeper, stop)
    }
}

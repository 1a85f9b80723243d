//! Where every path to one waiting lifecycle action meets: its action key.
//!
//! A message names its action by token; the reconciler and the manual command find an
//! action by instance id and have no token (Auto Scaling never tells one but in the
//! notification). So besides the token's claim ([`crate::claims`], which stays the record of
//! what became of a token), every run that works a waiting action also holds the claim of
//! its *action key*: the instance and the wait it is in, which both paths can name. The key
//! is a mutex, not a record: held (its lease renewed) while a run works the action, released
//! when the run ends, so a later action of the same kind (an instance returning to its warm
//! pool again) starts afresh. Whoever takes it second finds the action finished when it looks
//! again (a message: Auto Scaling no longer confirms it; the reconciler: the instance no
//! longer waits), so the steps run once.
//!
//! In one process the claim store answers "yours" to every task of the process, so
//! [`Local`] serialises the tasks of this process on the same key first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::claims::{Claim, ClaimError, Claims};
use crate::event::{InstanceId, Phase};

/// The key of the action `instance` waits for in `phase`: one per wait state, since Auto
/// Scaling cannot tell a plain launch from one out of the warm pool (`Pending:Wait`), nor
/// entering the pool from returning to it (`Warmed:Pending:Wait`).
pub fn key(instance: &InstanceId, phase: Phase) -> String {
    let wait = match phase {
        Phase::Launch | Phase::PoolLeave => "pending-wait",
        Phase::PoolEnter | Phase::PoolReturn => "warmed-pending-wait",
        Phase::Terminate => "terminating-wait",
    };
    format!("instance-action:{instance}:{wait}")
}

/// Action keys worked by tasks of this process.
#[derive(Default)]
pub struct Local(Mutex<HashMap<String, watch::Receiver<bool>>>);

impl Local {
    /// Whether a task of this process works `key` now.
    pub fn busy(&self, key: &str) -> bool {
        self.0.lock().unwrap().contains_key(key)
    }

    /// Waits until no other task of this process works `key`, then marks it worked until
    /// the guard drops. None when cancelled while waiting.
    pub async fn enter(self: &Arc<Self>, key: &str, cancel: &CancellationToken) -> Option<Turn> {
        loop {
            let mut busy = {
                let mut map = self.0.lock().unwrap();
                match map.get(key) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(false);
                        map.insert(key.to_string(), rx);
                        return Some(Turn {
                            local: self.clone(),
                            key: key.to_string(),
                            tx,
                        });
                    }
                }
            };
            tokio::select! {
                _ = busy.wait_for(|done| *done) => {}
                _ = cancel.cancelled() => return None,
            }
        }
    }
}

/// This process's turn at an action key; the next task waiting for it goes on when dropped.
pub struct Turn {
    local: Arc<Local>,
    key: String,
    tx: watch::Sender<bool>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.local.0.lock().unwrap().remove(&self.key);
        let _ = self.tx.send(true);
    }
}

/// An action key held in the claim store, its lease renewed until [`Hold::release`].
pub struct Hold {
    claims: Arc<dyn Claims>,
    key: String,
    owner: String,
    renewer: JoinHandle<()>,
    /// This process's turn at the key, held as long as the claim.
    turn: Option<Turn>,
}

/// What taking an action key came to.
pub enum Taken {
    Ours(Hold),
    /// Another owner works the action, its lease running until `until_ms`.
    Busy {
        owner: String,
        until_ms: i64,
    },
}

/// Who takes a key, for how long, in which store.
pub struct Taker {
    pub claims: Arc<dyn Claims>,
    pub owner: String,
    pub lease: Duration,
    /// The history row of the run taking it.
    pub run_id: i64,
}

impl Taker {
    /// Takes `key` in the claim store (take this process's turn at it first); `lost` is
    /// cancelled if another owner takes it over later (this owner's lease lapsed).
    pub async fn take(&self, key: &str, lost: CancellationToken) -> Result<Taken, ClaimError> {
        let claim = self
            .claims
            .claim(key, &self.owner, self.run_id, self.lease)
            .await?;
        if let Claim::Held { owner, until_ms } = claim {
            return Ok(Taken::Busy { owner, until_ms });
        }
        let (claims, k, owner, lease) = (
            self.claims.clone(),
            key.to_string(),
            self.owner.clone(),
            self.lease,
        );
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                match claims.renew(&k, &owner, lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(key = %k, "another owner took this lifecycle action over (this run's lease had lapsed); stopping");
                        lost.cancel();
                        return;
                    }
                    Err(e) => warn!(error = %e, "could not renew the action's claim; trying again"),
                }
            }
        });
        Ok(Taken::Ours(Hold {
            claims: self.claims.clone(),
            key: key.to_string(),
            owner: self.owner.clone(),
            renewer,
            turn: None,
        }))
    }
}

impl Hold {
    /// Keeps this process's turn at the key as long as the claim.
    pub fn with_turn(mut self, turn: Turn) -> Hold {
        self.turn = Some(turn);
        self
    }

    /// Lets the action key go: the next path to the action takes it at once.
    pub async fn release(self) {
        self.renewer.abort();
        if let Err(e) = self.claims.release(&self.key, &self.owner).await {
            warn!(error = %e, key = %self.key, "could not release the action's claim; it lapses with its lease");
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_and_a_lookup_by_instance_name_the_same_action() {
        let id = InstanceId::parse("i-0123456789abcdef0").unwrap();
        assert_eq!(key(&id, Phase::Launch), key(&id, Phase::PoolLeave));
        assert_eq!(key(&id, Phase::PoolEnter), key(&id, Phase::PoolReturn));
        assert_ne!(key(&id, Phase::Launch), key(&id, Phase::Terminate));
        assert_eq!(
            key(&id, Phase::Terminate),
            "instance-action:i-0123456789abcdef0:terminating-wait"
        );
    }

    #[tokio::test]
    async fn one_task_of_a_process_at_a_time_holds_a_key() {
        let local = Arc::new(Local::default());
        let cancel = CancellationToken::new();
        let first = local.enter("k", &cancel).await.unwrap();
        assert!(local.busy("k"));
        let second = {
            let local = local.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move { local.enter("k", &cancel).await.is_some() })
        };
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        drop(first);
        assert!(second.await.unwrap());
        assert!(!local.busy("k"));
    }

    #[tokio::test]
    async fn a_held_key_is_busy_for_another_owner_until_released() {
        let store = crate::store::Store::in_memory().unwrap();
        let claims: Arc<dyn Claims> = Arc::new(store.clone());
        let run_id = store
            .insert_run(crate::store::NewRun {
                token: Some("t"),
                ..Default::default()
            })
            .await
            .unwrap();
        let taker = |owner: &str| Taker {
            claims: claims.clone(),
            owner: owner.into(),
            lease: Duration::from_secs(60),
            run_id,
        };
        let (a, b) = (taker("a"), taker("b"));
        let (la, lb) = (Arc::new(Local::default()), Local::default());
        let c = CancellationToken::new();
        let turn = la.enter("k", &c).await.unwrap();
        let Taken::Ours(hold) = a.take("k", c.clone()).await.unwrap() else {
            panic!("a takes a free key");
        };
        let hold = hold.with_turn(turn);
        assert!(matches!(
            b.take("k", c.clone()).await.unwrap(),
            Taken::Busy { .. }
        ));
        hold.release().await;
        assert!(matches!(
            b.take("k", c.clone()).await.unwrap(),
            Taken::Ours(_)
        ));
        assert!(!lb.busy("k"));
    }
}

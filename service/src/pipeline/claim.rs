//! Claiming a lifecycle action before working it.
//!
//! Two claims, one inside the other: in this process, the same token is worked by one task
//! at a time (a second delivery waits for the first, then finds it done); in the store, the
//! token's row says whether the action is new, decided (steps ran, completion left) or done.
//! Owns neither the steps nor the completion.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Job, Pipeline, RunReport};
use crate::layer::Layer;
use crate::store::{Claim, StoreError};

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

impl Pipeline {
    /// Records the run's first row, then claims its token in the store.
    pub(super) async fn claim(
        &self,
        job: &Job,
        layer: &Layer,
        run: &mut RunReport,
    ) -> Result<(i64, Claim), StoreError> {
        let run_id = self.open_run(job, Some(&layer.name)).await?;
        run.run_id = Some(run_id);
        let claim = self
            .store
            .claim(&job.event.token, &self.owner, run_id)
            .await?;
        Ok((run_id, claim))
    }
}

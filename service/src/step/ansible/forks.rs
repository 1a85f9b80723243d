//! One budget of forks for every `ansible-playbook` run of this process.
//!
//! A burst becomes several runs that overlap (batches close as their members are reached,
//! while later instances are still arriving); each run forking `ansible.forks` workers of
//! its own would put several times that many connections and Python workers on the ops
//! host at once. On a small ops host that load made connections time out, and a healthy
//! instance was ABANDONed for it. So runs share one budget of `ansible.forks` (default
//! [`super::DEFAULT_FORKS`]): a run takes the forks that are free when it starts, at most
//! one per host, at least one (waiting for one when none is free), and gives them back
//! when it ends. Ansible cannot widen a run's forks once it started, so a run that
//! started narrow stays narrow; the runs of a burst together never exceed the budget.
//!
//! Owns the counting; not the run (see `runner`).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct ForkBudget {
    free: Arc<Semaphore>,
    total: usize,
}

/// Forks held by one run; given back on drop.
pub struct Forks(OwnedSemaphorePermit);

impl Forks {
    pub fn count(&self) -> usize {
        self.0.num_permits()
    }
}

impl ForkBudget {
    pub fn new(total: usize) -> ForkBudget {
        let total = total.max(1);
        ForkBudget {
            free: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Forks for a run that could use `want`: what is free now (at most `want`, at most the
    /// budget), at least one.
    pub async fn take(&self, want: usize) -> Forks {
        let want = want.clamp(1, self.total);
        let mut held = self
            .free
            .clone()
            .acquire_owned()
            .await
            .expect("the budget's semaphore is never closed");
        while held.num_permits() < want {
            match self.free.clone().try_acquire_owned() {
                Ok(more) => held.merge(more),
                Err(_) => break,
            }
        }
        Forks(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_runs_share_the_budget_and_give_it_back() {
        let budget = ForkBudget::new(20);
        let first = budget.take(14).await;
        assert_eq!(first.count(), 14);
        let second = budget.take(10).await;
        assert_eq!(second.count(), 6, "only what the first left");
        // Nothing free: a third run waits for forks to come back.
        let third = tokio::spawn({
            let free = budget.free.clone();
            async move {
                let b = ForkBudget { free, total: 20 };
                b.take(26).await.count()
            }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        drop(first);
        assert_eq!(third.await.unwrap(), 14);
        drop(second);
        assert_eq!(budget.take(50).await.count(), 20, "at most the budget");
    }
}

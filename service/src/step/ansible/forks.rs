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

    /// Forks free now (none held back for a run about to start).
    pub fn free(&self) -> usize {
        self.free.available_permits()
    }

    /// Exactly `n` forks (at least one, at most the budget) if they are free now: for a run
    /// whose forks were fixed when it started early.
    pub fn try_take_exactly(&self, n: usize) -> Option<Forks> {
        let n = n.clamp(1, self.total);
        self.free
            .clone()
            .try_acquire_many_owned(n as u32)
            .ok()
            .map(Forks)
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

    #[tokio::test]
    async fn exactly_n_forks_only_when_all_n_are_free() {
        let budget = ForkBudget::new(20);
        let first = budget.take(14).await;
        assert_eq!(budget.free(), 6);
        assert!(
            budget.try_take_exactly(7).is_none(),
            "6 are free, 7 are not"
        );
        assert_eq!(budget.free(), 6, "a refusal takes nothing");
        let six = budget.try_take_exactly(6).expect("6 are free");
        assert_eq!((six.count(), budget.free()), (6, 0));
        drop((first, six));
        assert_eq!(budget.try_take_exactly(99).map(|f| f.count()), Some(20));
    }
}

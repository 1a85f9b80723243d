//! Gathering the instances that reach the same batched step within a short window, so
//! they share one call: one SendCommand for up to 50 instances (and, for the ansible step,
//! one ansible-playbook run).
//!
//! The first instance to arrive for a key opens a batch and supplies the function that runs
//! it; the batch closes when the window ends or it is full, and then runs in its own task,
//! so an instance that gives up waiting (shutdown, or its run lost its claim) does not stop
//! the others. The run sees who gave up ([`Left`]) and stops the work done for them; a
//! batch everyone left before it ran does nothing.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

type Run<I, R> =
    Box<dyn FnOnce(Vec<I>, Left) -> Pin<Box<dyn Future<Output = Vec<R>> + Send>> + Send>;

struct Open<I, R> {
    id: u64,
    items: Vec<(I, oneshot::Sender<R>, Arc<AtomicBool>)>,
    run: Run<I, R>,
    /// Woken when a member leaves.
    leaving: Arc<Notify>,
}

/// Which members of a batch stopped waiting for their result, by position.
#[derive(Clone, Default)]
pub struct Left(Arc<Vec<Arc<AtomicBool>>>, Arc<Notify>);

impl Left {
    /// Members who stopped waiting (true) or still wait (false), by position.
    #[cfg(test)]
    pub fn of(gone: &[bool]) -> Left {
        let flags = gone.iter().map(|&g| Arc::new(AtomicBool::new(g))).collect();
        Left(Arc::new(flags), Arc::new(Notify::new()))
    }

    /// Returns when a member stops waiting (at once if one did since the last call).
    pub async fn changed(&self) {
        self.1.notified().await;
    }

    /// Whether the member at `idx` stopped waiting.
    pub fn has(&self, idx: usize) -> bool {
        self.0.get(idx).is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// Whether every member stopped waiting.
    pub fn all(&self) -> bool {
        self.0.iter().all(|f| f.load(Ordering::Relaxed))
    }
}

/// Marks a member as gone when its waiting ends without its result.
struct Leaving(Arc<AtomicBool>, Arc<Notify>);

impl Drop for Leaving {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        self.1.notify_one();
    }
}

type Batches<K, I, R> = Arc<Mutex<HashMap<K, Open<I, R>>>>;

pub struct Gather<K, I, R> {
    open: Batches<K, I, R>,
    window: Duration,
    max: usize,
    next_id: AtomicU64,
}

impl<K, I, R> Gather<K, I, R>
where
    K: Eq + Hash + Clone + Send + 'static,
    I: Send + 'static,
    R: Send + 'static,
{
    pub fn new(window: Duration, max: usize) -> Self {
        Gather {
            open: Arc::new(Mutex::new(HashMap::new())),
            window,
            max: max.max(1),
            next_id: AtomicU64::new(1),
        }
    }

    /// Adds `item` to the open batch for `key` (opening one with `run` if there is none)
    /// and waits for its own result. `run` gets the items in arrival order, and who of them
    /// stopped waiting, and must return one result per item, in the same order. None if
    /// the batch task died. Dropping the returned future leaves the batch.
    pub async fn join<F, Fut>(&self, key: K, item: I, run: F) -> Option<R>
    where
        F: FnOnce(Vec<I>, Left) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let gone = Arc::new(AtomicBool::new(false));
        let leaving;
        let ready = {
            let mut open = self.open.lock().unwrap();
            match open.get_mut(&key) {
                Some(batch) => {
                    leaving = Leaving(gone.clone(), batch.leaving.clone());
                    batch.items.push((item, tx, gone));
                    if batch.items.len() >= self.max {
                        open.remove(&key)
                    } else {
                        None
                    }
                }
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let notify = Arc::new(Notify::new());
                    leaving = Leaving(gone.clone(), notify.clone());
                    let batch = Open {
                        id,
                        items: vec![(item, tx, gone)],
                        run: Box::new(move |items, left| Box::pin(run(items, left))),
                        leaving: notify,
                    };
                    if self.max == 1 {
                        Some(batch)
                    } else {
                        open.insert(key.clone(), batch);
                        let (open, window) = (self.open.clone(), self.window);
                        tokio::spawn(async move {
                            tokio::time::sleep(window).await;
                            let batch = {
                                let mut open = open.lock().unwrap();
                                match open.get(&key) {
                                    Some(b) if b.id == id => open.remove(&key),
                                    _ => None,
                                }
                            };
                            if let Some(b) = batch {
                                execute(b).await;
                            }
                        });
                        None
                    }
                }
            }
        };
        if let Some(b) = ready {
            tokio::spawn(execute(b));
        }
        let result = rx.await.ok();
        std::mem::forget(leaving);
        result
    }
}

async fn execute<I, R>(batch: Open<I, R>) {
    let mut items = Vec::with_capacity(batch.items.len());
    let mut replies = Vec::with_capacity(batch.items.len());
    let mut flags = Vec::with_capacity(batch.items.len());
    for (item, reply, gone) in batch.items {
        items.push(item);
        replies.push(reply);
        flags.push(gone);
    }
    let results = (batch.run)(items, Left(Arc::new(flags), batch.leaving)).await;
    for (reply, r) in replies.into_iter().zip(results) {
        let _ = reply.send(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(start_paused = true)]
    async fn arrivals_within_the_window_share_a_run_and_get_their_own_result() {
        let g: Arc<Gather<&str, u32, u32>> = Arc::new(Gather::new(Duration::from_secs(2), 3));
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..7u32 {
            let (g, runs) = (g.clone(), runs.clone());
            let key = if i == 6 { "other" } else { "k" };
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100 * i as u64)).await;
                g.join(key, i, move |items: Vec<u32>, _| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    items.into_iter().map(|x| x * 10).collect()
                })
                .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), Some(i as u32 * 10));
        }
        // k: [0,1,2] full, [3,4,5] full; other: [6].
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_run_sees_who_stopped_waiting() {
        let g: Arc<Gather<&str, u32, u32>> = Arc::new(Gather::new(Duration::from_secs(1), 10));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let run = |seen: Arc<Mutex<Vec<bool>>>| {
            move |items: Vec<u32>, left: Left| async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                *seen.lock().unwrap() = (0..items.len()).map(|i| left.has(i)).collect();
                items
            }
        };
        let stays = tokio::spawn({
            let (g, seen) = (g.clone(), seen.clone());
            async move { g.join("k", 1, run(seen)).await }
        });
        let leaves = tokio::spawn({
            let (g, seen) = (g.clone(), seen.clone());
            async move { g.join("k", 2, run(seen)).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        leaves.abort();
        assert_eq!(stays.await.unwrap(), Some(1));
        assert_eq!(*seen.lock().unwrap(), [false, true]);
    }
}

//! A small single-flight cache with a time to live: concurrent misses for one key make one
//! call. Used for AWS descriptions that change rarely (lifecycle hooks, OpsWorks stacks),
//! so a burst of launches does not turn into a burst of identical Describe calls. Its keys
//! may come from messages (group names), so it holds at most [`CAPACITY`] of them: a
//! newcomer beyond that first drops the expired entries, then the oldest.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

type Slot<V> = (Instant, Arc<OnceCell<V>>);

/// The most keys a cache holds.
pub const CAPACITY: usize = 1024;

pub struct TtlCache<K, V> {
    ttl: Duration,
    map: Mutex<HashMap<K, Slot<V>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(ttl: Duration) -> Self {
        TtlCache {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The cached value, or the result of `load` (shared with every concurrent caller).
    /// A failed load is not cached.
    pub async fn get_or_load<E, F, Fut>(&self, key: &K, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let cell = {
            let mut map = self.map.lock().unwrap();
            let fresh = map
                .get(key)
                .filter(|(at, cell)| at.elapsed() < self.ttl || !cell.initialized())
                .map(|(_, c)| c.clone());
            match fresh {
                Some(c) => c,
                None => {
                    if map.len() >= CAPACITY {
                        evict(&mut map, self.ttl);
                    }
                    let c = Arc::new(OnceCell::new());
                    map.insert(key.clone(), (Instant::now(), c.clone()));
                    c
                }
            }
        };
        cell.get_or_try_init(load).await.cloned()
    }

    /// How long ago the key's value was loaded (zero while it loads; None: not cached).
    pub fn age(&self, key: &K) -> Option<Duration> {
        let map = self.map.lock().unwrap();
        let (at, cell) = map.get(key)?;
        Some(if cell.initialized() {
            at.elapsed()
        } else {
            Duration::ZERO
        })
    }

    /// Forgets a key (after a lookup found the cached value stale).
    pub fn invalidate(&self, key: &K) {
        self.map.lock().unwrap().remove(key);
    }

    /// How many keys the cache holds now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

/// Makes room for one more key: the expired entries go, then the oldest quarter.
fn evict<K: Eq + Hash + Clone, V>(map: &mut HashMap<K, Slot<V>>, ttl: Duration) {
    map.retain(|_, (at, _)| at.elapsed() < ttl);
    if map.len() < CAPACITY {
        return;
    }
    let mut ages: Vec<(Instant, K)> = map.iter().map(|(k, (at, _))| (*at, k.clone())).collect();
    ages.sort_unstable_by_key(|(at, _)| *at);
    for (_, k) in ages.into_iter().take(CAPACITY / 4) {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn concurrent_misses_load_once() {
        let c: TtlCache<&str, u32> = TtlCache::new(Duration::from_secs(60));
        let loads = AtomicU32::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, ()>(7)
        };
        let (a, b, d) = tokio::join!(
            c.get_or_load(&"k", load),
            c.get_or_load(&"k", load),
            c.get_or_load(&"k", load)
        );
        assert_eq!((a, b, d), (Ok(7), Ok(7), Ok(7)));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        c.invalidate(&"k");
        assert_eq!(c.get_or_load(&"k", load).await, Ok(7));
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn keys_chosen_by_senders_do_not_grow_it_without_bound() {
        let c: TtlCache<u32, u32> = TtlCache::new(Duration::from_secs(60));
        for k in 0..(CAPACITY as u32 * 3) {
            c.get_or_load(&k, || async { Ok::<_, ()>(k) })
                .await
                .unwrap();
            assert!(c.held() <= CAPACITY, "{} keys", c.held());
        }
        // The newest stay.
        let last = CAPACITY as u32 * 3 - 1;
        let reloaded = c.get_or_load(&last, || async { Ok::<_, ()>(0) }).await;
        assert_eq!(reloaded, Ok(last));
    }
}

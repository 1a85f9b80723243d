//! Which instances share one `ansible-playbook` run, and when it starts.
//!
//! An instance *enters* the batch of its key (playbook, vars, layer, ...) as soon as its step
//! starts, before it is reached over SSH, so reaching the instances of a burst happens while
//! the batch is open instead of before it. A batch:
//!
//! - accepts newcomers until it is full (`ansible.max_batch`), or `ansible.batch_window` has
//!   passed since it opened, or nobody new entered for `ansible.batch_quiet` while every
//!   member is already reached (a burst that has arrived does not wait the whole window);
//! - starts as soon as it accepts no one any more and every member is reached (or gave up:
//!   a member whose reach fails leaves the batch);
//! - does not wait for a slow member forever: once `straggle` has passed without a member
//!   being reached (counted from the latest one that was), it starts with the reached ones,
//!   and the others enter a later batch once reached. Counted from the latest reach, not the
//!   first: on a busy ops host the members of a burst are reached over several seconds, one
//!   after another, and a run started `straggle` after the first would split the burst into
//!   several overlapping runs (each its own `ansible-playbook` and Mitogen), slower together
//!   than one.
//!
//! A batch's run is *opened* as the batch opens ([`Runs::open`]), so that it can get ready
//! while the members are reached: the runner starts `ansible-playbook` then, and hands it the
//! inventory once the batch starts.
//!
//! Owns the gathering; not the reaching (the step does it, [`crate::ssh`]) nor the run
//! (the runner). Other batched steps (ssm) use [`crate::step::gather`], whose items are
//! ready when they arrive.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

type RunFuture<R> = Pin<Box<dyn Future<Output = Vec<R>> + Send>>;
/// Runs one batch once its members are known: the reached items in entry order in, one
/// result per item out.
pub type Start<I, R> = Box<dyn FnOnce(Vec<I>) -> RunFuture<R> + Send>;

/// How the batches of one key run.
pub trait Runs<I, R>: Send + Sync {
    /// A batch opened: what runs it once its members are known. Called as the batch opens,
    /// before any member is reached, so that a run can get ready meanwhile (the runner starts
    /// `ansible-playbook`); dropped unused when the batch ends without a run (every member
    /// left), which must undo whatever it started.
    fn open(self: Arc<Self>) -> Start<I, R>;
}

/// The runs of one key's batches.
pub type Run<I, R> = Arc<dyn Runs<I, R>>;

/// How long batches gather.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub window: Duration,
    pub quiet: Duration,
    pub straggle: Duration,
    pub max: usize,
}

enum Member<I, R> {
    Reaching,
    Ready(I, oneshot::Sender<R>),
}

struct Batch<K, I, R> {
    key: K,
    opened: Instant,
    last_entry: Instant,
    /// When a member was last reached.
    last_ready: Option<Instant>,
    members: Vec<(u64, Member<I, R>)>,
    /// Its run, opened with the batch.
    start: Start<I, R>,
    wake: Arc<Notify>,
}

struct State<K, I, R> {
    batches: HashMap<u64, Batch<K, I, R>>,
    /// The batch of each key that still accepts newcomers.
    accepting: HashMap<K, u64>,
    next_id: u64,
}

pub struct Batches<K, I, R> {
    state: Arc<Mutex<State<K, I, R>>>,
    timing: Timing,
}

/// An instance's place in a batch while it is being reached. Dropped without
/// [`Ticket::ready`] (the reach failed, the step was cancelled), it leaves the batch.
pub struct Ticket<K, I, R>
where
    K: Eq + Hash + Clone + Send + 'static,
    I: Send + 'static,
    R: Send + 'static,
{
    batches: Arc<Mutex<State<K, I, R>>>,
    timing: Timing,
    key: K,
    place: Option<(u64, u64)>,
    run: Run<I, R>,
}

enum Next {
    Start,
    Abandon,
    Wait(Option<Instant>),
}

impl<K, I, R> Batches<K, I, R>
where
    K: Eq + Hash + Clone + Send + 'static,
    I: Send + 'static,
    R: Send + 'static,
{
    pub fn new(timing: Timing) -> Self {
        Batches {
            state: Arc::new(Mutex::new(State {
                batches: HashMap::new(),
                accepting: HashMap::new(),
                next_id: 1,
            })),
            timing: Timing {
                max: timing.max.max(1),
                ..timing
            },
        }
    }

    /// Enters the accepting batch of `key` (opening one, run by `run`, when there is none)
    /// as a member still being reached.
    pub fn enter(&self, key: K, run: Run<I, R>) -> Ticket<K, I, R> {
        let place = {
            let mut st = self.state.lock().unwrap();
            add(
                &self.state,
                &mut st,
                self.timing,
                &key,
                &run,
                Member::Reaching,
            )
        };
        Ticket {
            batches: self.state.clone(),
            timing: self.timing,
            key,
            place: Some(place),
            run,
        }
    }
}

impl<K, I, R> Ticket<K, I, R>
where
    K: Eq + Hash + Clone + Send + 'static,
    I: Send + 'static,
    R: Send + 'static,
{
    /// The member is reached: it waits for its batch to run and returns its own result.
    /// A member its batch started without (a straggler) joins a later batch. None if the
    /// run died.
    pub async fn ready(mut self, item: I) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.batches.lock().unwrap();
            let mut item = Some((item, tx));
            if let Some((b, m)) = self.place {
                if let Some(batch) = st.batches.get_mut(&b) {
                    if let Some(slot) = batch.members.iter_mut().find(|(id, _)| *id == m) {
                        let (i, tx) = item.take().expect("set above");
                        slot.1 = Member::Ready(i, tx);
                        batch.last_ready = Some(Instant::now());
                        batch.wake.notify_one();
                    }
                }
            }
            if let Some((i, tx)) = item {
                // Its batch left without it: a later one takes it, ready as it is.
                let place = add(
                    &self.batches,
                    &mut st,
                    self.timing,
                    &self.key,
                    &self.run,
                    Member::Ready(i, tx),
                );
                self.place = Some(place);
            }
        }
        let r = rx.await.ok();
        // Its batch ran: nothing to leave.
        self.place = None;
        r
    }
}

impl<K, I, R> Drop for Ticket<K, I, R>
where
    K: Eq + Hash + Clone + Send + 'static,
    I: Send + 'static,
    R: Send + 'static,
{
    fn drop(&mut self) {
        let Some((b, m)) = self.place.take() else {
            return;
        };
        let mut st = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(batch) = st.batches.get_mut(&b) {
            batch.members.retain(|(id, _)| *id != m);
            batch.wake.notify_one();
        }
    }
}

/// Adds a member to the accepting batch of `key`, or opens one (with its driver task).
/// Returns (batch id, member id).
fn add<K, I, R>(
    shared: &Arc<Mutex<State<K, I, R>>>,
    st: &mut State<K, I, R>,
    timing: Timing,
    key: &K,
    run: &Run<I, R>,
    member: Member<I, R>,
) -> (u64, u64)
where
    K: Eq + Hash + Clone + Send + 'static,
    I: Send + 'static,
    R: Send + 'static,
{
    let now = Instant::now();
    let member_id = st.next_id;
    st.next_id += 1;
    let ready = matches!(member, Member::Ready(..));
    if let Some(&b) = st.accepting.get(key) {
        let batch = st.batches.get_mut(&b).expect("accepting batches exist");
        batch.members.push((member_id, member));
        batch.last_entry = now;
        if ready {
            batch.last_ready = Some(now);
        }
        if batch.members.len() >= timing.max {
            st.accepting.remove(key);
        }
        batch.wake.notify_one();
        return (b, member_id);
    }
    let b = st.next_id;
    st.next_id += 1;
    let wake = Arc::new(Notify::new());
    st.batches.insert(
        b,
        Batch {
            key: key.clone(),
            opened: now,
            last_entry: now,
            last_ready: ready.then_some(now),
            members: vec![(member_id, member)],
            start: run.clone().open(),
            wake: wake.clone(),
        },
    );
    if timing.max > 1 {
        st.accepting.insert(key.clone(), b);
    }
    tokio::spawn(drive(shared.clone(), b, timing, wake));
    (b, member_id)
}

/// Decides, as time passes and members change, when batch `b` starts; then runs it.
async fn drive<K, I, R>(
    shared: Arc<Mutex<State<K, I, R>>>,
    b: u64,
    timing: Timing,
    wake: Arc<Notify>,
) where
    K: Eq + Hash + Clone + Send + 'static,
    I: Send + 'static,
    R: Send + 'static,
{
    enum Step<B> {
        Run(B),
        /// Ended without a run: the batch is dropped (and its opened run undone) outside
        /// the lock.
        End(Option<B>),
        Wait(Option<Instant>),
    }
    loop {
        let step = {
            let mut st = shared.lock().unwrap();
            let next = match st.batches.get(&b) {
                Some(batch) => decide(batch, timing, Instant::now()),
                None => Next::Abandon,
            };
            if !matches!(next, Next::Wait(_)) || !accepts(&st, b, timing) {
                // Newcomers open another batch from now on.
                if let Some(key) = st.batches.get(&b).map(|batch| batch.key.clone()) {
                    if st.accepting.get(&key) == Some(&b) {
                        st.accepting.remove(&key);
                    }
                }
            }
            match next {
                Next::Start => Step::Run(st.batches.remove(&b).expect("decided on it")),
                Next::Abandon => Step::End(st.batches.remove(&b)),
                Next::Wait(until) => Step::Wait(until),
            }
        };
        match step {
            Step::End(batch) => {
                drop(batch);
                return;
            }
            Step::Wait(Some(t)) => {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep_until(t) => {}
                }
            }
            Step::Wait(None) => wake.notified().await,
            Step::Run(batch) => {
                // Members still being reached are left out: their tickets find the batch
                // gone and enter a later one.
                let (items, replies): (Vec<I>, Vec<oneshot::Sender<R>>) = batch
                    .members
                    .into_iter()
                    .filter_map(|(_, m)| match m {
                        Member::Ready(i, tx) => Some((i, tx)),
                        Member::Reaching => None,
                    })
                    .unzip();
                let mut replies = replies;
                // Every member's step stopped (shutdown, or their runs lost their claims):
                // the run is dropped, which stops its process group.
                let results = {
                    let all_left = async {
                        for reply in replies.iter_mut() {
                            reply.closed().await;
                        }
                    };
                    tokio::select! {
                        r = (batch.start)(items) => Some(r),
                        () = all_left => None,
                    }
                };
                let Some(results) = results else {
                    tracing::warn!(
                        "every member of the batch stopped waiting: its run was stopped"
                    );
                    return;
                };
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
                return;
            }
        }
    }
}

fn accepts<K, I, R>(st: &State<K, I, R>, b: u64, timing: Timing) -> bool {
    st.batches
        .get(&b)
        .is_some_and(|batch| accepting(batch, timing, Instant::now()))
}

/// Whether the batch still takes newcomers at `now`.
fn accepting<K, I, R>(batch: &Batch<K, I, R>, timing: Timing, now: Instant) -> bool {
    let reaching = batch
        .members
        .iter()
        .any(|(_, m)| matches!(m, Member::Reaching));
    batch.members.len() < timing.max
        && timing.max > 1
        && now < batch.opened + timing.window
        && (reaching || now < batch.last_entry + timing.quiet)
}

fn decide<K, I, R>(batch: &Batch<K, I, R>, timing: Timing, now: Instant) -> Next {
    let reaching = batch
        .members
        .iter()
        .filter(|(_, m)| matches!(m, Member::Reaching))
        .count();
    let ready = batch.members.len() - reaching;
    if accepting(batch, timing, now) {
        let mut until = batch.opened + timing.window;
        if reaching == 0 {
            until = until.min(batch.last_entry + timing.quiet);
        }
        return Next::Wait(Some(until));
    }
    if batch.members.is_empty() {
        return Next::Abandon;
    }
    if ready == 0 {
        // Only members being reached: the first to be reached (or to give up) wakes us.
        return Next::Wait(None);
    }
    if reaching == 0 {
        return Next::Start;
    }
    let stragglers_until = batch.last_ready.unwrap_or(now) + timing.straggle;
    if now >= stragglers_until {
        Next::Start
    } else {
        Next::Wait(Some(stragglers_until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(max: usize) -> Timing {
        Timing {
            window: Duration::from_secs(2),
            quiet: Duration::from_millis(300),
            straggle: Duration::from_secs(2),
            max,
        }
    }

    /// Batches run by `f`, which has nothing to get ready before the members are known.
    fn run_fn<I, R>(f: impl Fn(Vec<I>) -> RunFuture<R> + Send + Sync + 'static) -> Run<I, R>
    where
        I: 'static,
        R: 'static,
    {
        struct Plain<F>(F);
        impl<I, R, F> Runs<I, R> for Plain<F>
        where
            F: Fn(Vec<I>) -> RunFuture<R> + Send + Sync + 'static,
            I: 'static,
            R: 'static,
        {
            fn open(self: Arc<Self>) -> Start<I, R> {
                Box::new(move |items| (self.0)(items))
            }
        }
        Arc::new(Plain(f))
    }

    /// Each run's items, and when it started.
    type RunLog = Arc<Mutex<Vec<(Vec<u32>, Duration)>>>;

    /// A run that records its batches and answers each item times ten.
    fn recorder(runs: RunLog, t0: Instant) -> Run<u32, u32> {
        run_fn(move |items: Vec<u32>| {
            runs.lock().unwrap().push((items.clone(), t0.elapsed()));
            Box::pin(async move { items.into_iter().map(|x| x * 10).collect() })
        })
    }

    /// Enters at `enter_ms`, is reached `reach_ms` later (never, with None), returns its result.
    fn member(
        b: &Arc<Batches<&'static str, u32, u32>>,
        run: &Run<u32, u32>,
        i: u32,
        enter_ms: u64,
        reach_ms: Option<u64>,
    ) -> tokio::task::JoinHandle<Option<u32>> {
        let (b, run) = (b.clone(), run.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(enter_ms)).await;
            let ticket = b.enter("k", run);
            match reach_ms {
                Some(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    ticket.ready(i).await
                }
                None => None,
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_every_member_left_is_stopped() {
        let b = Arc::new(Batches::new(timing(50)));
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let run: Run<u32, u32> = {
            let finished = finished.clone();
            run_fn(move |items: Vec<u32>| {
                let finished = finished.clone();
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    finished.store(true, std::sync::atomic::Ordering::SeqCst);
                    items
                })
            })
        };
        let member = tokio::spawn({
            let (b, run) = (b.clone(), run.clone());
            async move { b.enter("k", run).ready(1).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        member.abort(); // its step stopped mid-run
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(
            !finished.load(std::sync::atomic::Ordering::SeqCst),
            "the run was dropped, not left to finish"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_starts_once_reached_and_quiet_not_at_the_end_of_the_window() {
        let b = Arc::new(Batches::new(timing(50)));
        let runs = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let run = recorder(runs.clone(), t0);
        // Five arrive within 40 ms; reaching them takes 100..500 ms.
        let tasks: Vec<_> = (0..5u32)
            .map(|i| member(&b, &run, i, 10 * i as u64, Some(100 * (i as u64 + 1))))
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), Some(i as u32 * 10));
        }
        let runs = runs.lock().unwrap();
        assert_eq!(runs.len(), 1, "one run for the burst");
        assert_eq!(runs[0].0, vec![0, 1, 2, 3, 4]);
        // The last was reached at 540 ms and nobody entered after 40 ms: it starts at once,
        // not at 2 s.
        assert!(runs[0].1 < Duration::from_millis(600), "{:?}", runs[0].1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_whose_reach_fails_leaves_without_holding_up_the_others() {
        let b = Arc::new(Batches::new(timing(50)));
        let runs = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let run = recorder(runs.clone(), t0);
        let ok = member(&b, &run, 1, 0, Some(100));
        let gives_up = member(&b, &run, 2, 0, None);
        assert_eq!(ok.await.unwrap(), Some(10));
        assert_eq!(gives_up.await.unwrap(), None);
        let runs = runs.lock().unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].0, vec![1]);
        assert!(runs[0].1 < Duration::from_millis(500), "{:?}", runs[0].1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_reached_one_after_another_stays_one_run() {
        let b = Arc::new(Batches::new(timing(50)));
        let runs = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let run = recorder(runs.clone(), t0);
        // Five enter at once and are reached 1.5 s apart (a busy ops host): each wait is
        // shorter than the straggle allowance, the whole spread (6 s) much longer.
        let tasks: Vec<_> = (0..5u32)
            .map(|i| member(&b, &run, i, 0, Some(1500 * (i as u64 + 1))))
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), Some(i as u32 * 10));
        }
        let runs = runs.lock().unwrap();
        assert_eq!(runs.len(), 1, "one run for the burst: {runs:?}");
        assert_eq!(runs[0].0, vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_straggler_goes_to_a_later_run_and_a_full_batch_starts_at_once() {
        let b = Arc::new(Batches::new(timing(3)));
        let runs = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let run = recorder(runs.clone(), t0);
        // Batch of 3 (full): 0 and 1 reached fast, 2 takes 10 s: the first two start after
        // the straggle allowance, 2 runs alone later. 3 and 4 open another batch.
        let tasks = vec![
            member(&b, &run, 0, 0, Some(100)),
            member(&b, &run, 1, 0, Some(100)),
            member(&b, &run, 2, 0, Some(10_000)),
            member(&b, &run, 3, 5, Some(100)),
            member(&b, &run, 4, 5, Some(100)),
        ];
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), Some(i as u32 * 10));
        }
        let mut runs = runs.lock().unwrap().clone();
        runs.sort_by_key(|r| r.1);
        let batches: Vec<Vec<u32>> = runs.iter().map(|r| r.0.clone()).collect();
        assert_eq!(batches, vec![vec![3, 4], vec![0, 1], vec![2]]);
        // 0 and 1: reached at 100 ms, straggle 2 s.
        assert!(runs[1].1 >= Duration::from_millis(2100) && runs[1].1 < Duration::from_secs(3));
        // 2 was reached at 10 s and ran after a quiet period.
        assert!(runs[2].1 >= Duration::from_secs(10));
    }

    /// Counts the batches opened, run, and ended without a run (their start dropped unused).
    #[derive(Default)]
    struct Opens {
        opened: std::sync::atomic::AtomicUsize,
        ran: std::sync::atomic::AtomicUsize,
        dropped_unused: Arc<std::sync::atomic::AtomicUsize>,
    }

    struct Unused(Option<Arc<std::sync::atomic::AtomicUsize>>);
    impl Unused {
        fn disarm(mut self) {
            self.0 = None;
        }
    }

    impl Drop for Unused {
        fn drop(&mut self) {
            if let Some(n) = self.0.take() {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    impl Runs<u32, u32> for Opens {
        fn open(self: Arc<Self>) -> Start<u32, u32> {
            use std::sync::atomic::Ordering::SeqCst;
            self.opened.fetch_add(1, SeqCst);
            let guard = Unused(Some(self.dropped_unused.clone()));
            Box::new(move |items| {
                guard.disarm();
                self.ran.fetch_add(1, SeqCst);
                Box::pin(async move { items.into_iter().map(|x| x + 1).collect() })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_opens_with_its_batch_and_is_dropped_unused_when_every_member_left() {
        use std::sync::atomic::Ordering::SeqCst;
        let b = Arc::new(Batches::new(timing(50)));
        let opens = Arc::new(Opens::default());
        let run: Run<u32, u32> = opens.clone();
        // Opened as the first member enters, before it is reached; once for the batch.
        let t1 = b.enter("k", run.clone());
        let t2 = b.enter("k", run.clone());
        assert_eq!(opens.opened.load(SeqCst), 1);
        assert_eq!(opens.ran.load(SeqCst), 0);
        let (r1, r2) = tokio::join!(t1.ready(1), t2.ready(2));
        assert_eq!((r1, r2), (Some(2), Some(3)));
        assert_eq!(opens.ran.load(SeqCst), 1);
        assert_eq!(opens.dropped_unused.load(SeqCst), 0);
        // A batch whose every member gives up: its opened run is dropped, never run.
        let t3 = b.enter("k", run.clone());
        assert_eq!(opens.opened.load(SeqCst), 2);
        drop(t3);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(opens.ran.load(SeqCst), 1);
        assert_eq!(opens.dropped_unused.load(SeqCst), 1);
    }
}

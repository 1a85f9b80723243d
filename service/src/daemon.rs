//! The SQS source: long-poll the queue, hand each message to the pipeline, settle it.
//!
//! Owns receiving (never more messages than there are free slots: a message waiting for a
//! slot would sit invisible with nobody heartbeating its hook) and the end of the loop: on
//! shutdown no more receives, in-flight work gets the grace period, then it is cancelled and
//! its messages released so another worker takes them. `Mode::Drain` is the one-shot worker:
//! it stops once a receive comes back empty with nothing in flight. Concurrency is the
//! [`Engine`]'s, acknowledgement the [`Acks`]'s, the work the [`Pipeline`]'s.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::aws::{AwsError, Message, Queue};
use crate::delivery::{Acks, Deleter, Delivery, RejectRule, Settled};
use crate::engine::{Done, Engine, Slot};
use crate::metrics::Stats;
use crate::pipeline::Pipeline;
use crate::retry::Backoff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Poll forever (until shutdown).
    Daemon,
    /// Drain the queue once and return.
    Drain,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub max_in_flight: usize,
    pub wait_time: Duration,
    pub visibility_timeout: Duration,
    pub shutdown_grace: Duration,
    pub retry_for: Duration,
    /// Where rejected messages go; "auto" is decided after the first successful receive.
    pub reject: RejectRule,
}

/// What a run of the loop did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub received: u64,
    /// Deleted after being handled (completed, skipped, rejected, duplicate).
    pub deleted: u64,
    /// Left or released to come back.
    pub released: u64,
    /// Acknowledgements that failed (the message will come back and be found done).
    pub ack_errors: u64,
    pub receive_errors: u64,
    /// Drain mode stopped because the queue could not be read.
    pub gave_up: bool,
}

impl Summary {
    /// The sum of two sources' summaries.
    pub fn add(&mut self, o: &Summary) {
        self.received += o.received;
        self.deleted += o.deleted;
        self.released += o.released;
        self.ack_errors += o.ack_errors;
        self.receive_errors += o.receive_errors;
        self.gave_up |= o.gave_up;
    }

    /// True when every message received was handled and acknowledged.
    pub fn all_handled(&self) -> bool {
        self.released == 0 && self.ack_errors == 0 && !self.gave_up
    }

    fn tally(&mut self, done: Done<Settled>) {
        match done {
            Ok(Settled::Handled) => self.deleted += 1,
            Ok(Settled::Released) => self.released += 1,
            Ok(Settled::AckFailed) => self.ack_errors += 1,
            Err(e) => {
                error!(error = %e, "message task panicked; its message will come back");
                self.released += 1;
            }
        }
    }
}

const OUTBOX_EVERY: Duration = Duration::from_secs(60);
/// How often the loop marks itself alive while it waits for a free slot.
const ALIVE_EVERY: Duration = Duration::from_secs(5);
/// How long a receive waits for more free slots before asking for fewer than ten messages.
const BATCH_FILL: Duration = Duration::from_millis(100);
/// Stops after this many consecutive failed receives in drain mode (the daemon keeps trying).
const DRAIN_MAX_RECEIVE_FAILURES: u32 = 5;
/// The pause after failed receives in a row.
const RECEIVE_PAUSES: Backoff =
    Backoff::doubling(Duration::from_secs(1), Duration::from_secs(60)).full_jitter();

type Shutdown<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send)>;

/// Receives and works messages until `shutdown` or `retire` (or, draining, until the queue
/// is empty), then winds down the work in flight: at `shutdown` it gets the grace period;
/// at `retire` (a reload removed the source) it finishes, however long it takes, unless
/// `shutdown` comes meanwhile.
pub async fn run(
    pipeline: Arc<Pipeline>,
    queue: Arc<dyn Queue>,
    settings: Settings,
    mode: Mode,
    shutdown: &CancellationToken,
    retire: &CancellationToken,
) -> Summary {
    let acks = Arc::new(Acks::spawn(
        queue.clone(),
        settings.retry_for,
        Deleter::Us,
        settings.reject.clone(),
    ));
    let outbox = spawn_outbox(pipeline.clone());
    let mut listener = Listener {
        engine: Engine::new(settings.max_in_flight),
        pipeline,
        queue,
        acks: acks.clone(),
        settings,
        mode,
        summary: Summary::default(),
        receive_failures: 0,
    };
    let stop_receiving = async {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = retire.cancelled() => {}
        }
    };
    tokio::pin!(stop_receiving);
    listener.run(stop_receiving).await;
    // Retired by a reload: its runs finish (until shutdown). Otherwise (shutdown, a drain
    // that ended or gave up) in-flight work gets the grace period below.
    if retire.is_cancelled() && !shutdown.is_cancelled() {
        listener.finish_in_flight(shutdown).await;
    }
    let summary = listener.drain().await;
    outbox.cancel();
    if let Ok(acks) = Arc::try_unwrap(acks) {
        acks.close().await;
    }
    summary
}

/// Result events that failed to publish earlier (the outbox): at start, then every minute,
/// until the returned token is cancelled.
fn spawn_outbox(pipeline: Arc<Pipeline>) -> CancellationToken {
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            pipeline.republish().await;
            tokio::select! {
                _ = tokio::time::sleep(OUTBOX_EVERY) => {}
                _ = stopped.cancelled() => return,
            }
        }
    });
    stop
}

struct Listener {
    engine: Engine<Settled>,
    pipeline: Arc<Pipeline>,
    queue: Arc<dyn Queue>,
    acks: Arc<Acks>,
    settings: Settings,
    mode: Mode,
    summary: Summary,
    receive_failures: u32,
}

impl Listener {
    /// The receive loop: free slots, receive that many, start each message.
    async fn run(&mut self, mut shutdown: Shutdown<'_>) {
        loop {
            for done in self.engine.finished() {
                self.summary.tally(done);
            }
            let slots = tokio::select! {
                biased;
                _ = &mut shutdown => return,
                s = self.free_slots() => s,
            };
            let received = tokio::select! {
                biased;
                _ = &mut shutdown => return,
                r = self.receive(slots.len()) => r,
            };
            let at = Instant::now();
            match received {
                Ok(messages) if messages.is_empty() => {
                    drop(slots);
                    if !self.idle().await {
                        return;
                    }
                }
                Ok(messages) => self.start(messages, slots, at),
                Err(e) => {
                    drop(slots);
                    let Some(pause) = self.receive_failed(e) else {
                        return;
                    };
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// Up to ten free slots; says it is alive while all are busy (that is healthy).
    async fn free_slots(&self) -> Vec<Slot> {
        let stats = &self.pipeline.stats;
        loop {
            tokio::select! {
                s = self.engine.slots(10, BATCH_FILL) => return s,
                _ = tokio::time::sleep(ALIVE_EVERY) => Stats::mark(&stats.loop_alive_ms),
            }
        }
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<Message>, AwsError> {
        let wait = match self.mode {
            Mode::Daemon => self.settings.wait_time,
            // Draining: a short poll is enough to tell "empty" from "busy".
            Mode::Drain => self.settings.wait_time.min(Duration::from_secs(1)),
        };
        let r = self
            .queue
            .receive(max as u32, wait, self.settings.visibility_timeout)
            .await;
        if r.is_ok() {
            self.receive_failures = 0;
            let stats = &self.pipeline.stats;
            Stats::mark(&stats.last_poll_ms);
            Stats::mark(&stats.loop_alive_ms);
            // The queue answers with these credentials now (a role that could not be
            // assumed at start may be since): its dead-letter setup can be read.
            self.settings.reject.decide(self.queue.as_ref()).await;
        }
        r
    }

    /// An empty receive. Draining, it may end the loop (false) once nothing is in flight;
    /// with work in flight, wait for some to finish: it may release its message.
    async fn idle(&mut self) -> bool {
        if self.mode == Mode::Daemon {
            return true;
        }
        match self.engine.next().await {
            Some(done) => {
                self.summary.tally(done);
                true
            }
            None => false,
        }
    }

    /// How long to pause after a failed receive; None to give up (draining only).
    fn receive_failed(&mut self, e: AwsError) -> Option<Duration> {
        Stats::inc(&self.pipeline.stats.receive_errors);
        self.summary.receive_errors += 1;
        self.receive_failures += 1;
        let failures = self.receive_failures;
        error!(error = %e, failures, "cannot receive from the queue");
        if self.mode == Mode::Drain && (!e.retryable() || failures >= DRAIN_MAX_RECEIVE_FAILURES) {
            error!("giving up: the queue cannot be read");
            self.summary.gave_up = true;
            return None;
        }
        Some(RECEIVE_PAUSES.delay(failures))
    }

    /// Starts one task per message, each in its own slot.
    fn start(&mut self, messages: Vec<Message>, slots: Vec<Slot>, at: Instant) {
        self.summary.received += messages.len() as u64;
        for (msg, slot) in messages.into_iter().zip(slots) {
            let delivery = Delivery::new(msg, at, self.pipeline.leases());
            let (pipeline, acks) = (self.pipeline.clone(), self.acks.clone());
            self.engine.start(slot, move |cancel| async move {
                handle(&pipeline, &acks, delivery, &cancel).await
            });
        }
    }

    /// Retired: the work in flight finishes, until `shutdown` (then [`Listener::drain`]).
    async fn finish_in_flight(&mut self, shutdown: &CancellationToken) {
        if self.engine.in_flight() > 0 {
            info!(
                in_flight = self.engine.in_flight(),
                "no longer receiving from this queue; its runs in flight finish"
            );
        }
        loop {
            tokio::select! {
                done = self.engine.next() => match done {
                    Some(done) => self.summary.tally(done),
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Shutdown (or drain finished): in-flight work gets the grace period, then is
    /// cancelled and its messages released.
    async fn drain(mut self) -> Summary {
        for done in self.engine.finished() {
            self.summary.tally(done);
        }
        if self.engine.in_flight() > 0 {
            info!(in_flight = self.engine.in_flight(), grace = ?self.settings.shutdown_grace, "waiting for in-flight events");
            let cancel_at = Instant::now() + self.settings.shutdown_grace;
            let why = "grace period over; releasing unfinished events to the queue";
            for done in self.engine.finish(cancel_at, None, why).await {
                self.summary.tally(done);
            }
        }
        self.summary
    }
}

/// One message: worked by the pipeline, then settled.
async fn handle(
    pipeline: &Pipeline,
    acks: &Acks,
    delivery: Delivery,
    cancel: &CancellationToken,
) -> Settled {
    let _in_flight = InFlight::count(&pipeline.stats);
    let outcome = pipeline.handle(&delivery, cancel).await;
    acks.settle(delivery, outcome).await
}

/// Counts a message as in flight until dropped.
struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    fn count(stats: &'a Stats) -> InFlight<'a> {
        Stats::inc(&stats.in_flight);
        InFlight(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use crate::aws::fake::{FakeHooks, FakeInstances, Unused};
    use crate::aws::{BatchResult, ErrorClass, Services};
    use crate::config::{Config, OnReject};
    use crate::lease::Leases;
    use crate::pipeline::Parts;
    use crate::store::Store;

    const CONFIG: &str = r#"
[queue]
url = "https://sqs.eu-west-1.amazonaws.com/210987654321/lifecycle"
[state]
path = "unused"
[aws]
retry_for = "1s"
[layers.web]
groups = ["web-*"]
launch = [ { tag = { Name = "web-{instance_id}" } } ]
"#;

    /// A member account's queue with a dead-letter queue, read with a role that cannot be
    /// assumed for the first receive: until a receive succeeded, every call is refused.
    /// Then it hands out one message nobody can handle. Records its calls in order.
    #[derive(Default)]
    struct MemberQueue {
        receives: Mutex<u32>,
        calls: Mutex<Vec<String>>,
    }

    impl MemberQueue {
        fn note(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }

        fn role_assumed(&self) -> bool {
            *self.receives.lock().unwrap() > 1
        }
    }

    fn refused(op: &'static str) -> AwsError {
        AwsError {
            operation: op,
            code: Some("AccessDenied".into()),
            message: "cannot assume role provision-member".into(),
            // STS failing for a while (a refusal would be Access: a drain gives up on it).
            class: ErrorClass::Credentials,
        }
    }

    #[async_trait]
    impl Queue for MemberQueue {
        async fn receive(
            &self,
            _: u32,
            _: Duration,
            _: Duration,
        ) -> Result<Vec<Message>, AwsError> {
            let n = {
                let mut r = self.receives.lock().unwrap();
                *r += 1;
                *r
            };
            if n == 1 {
                self.note("receive refused".into());
                return Err(refused("sqs:ReceiveMessage"));
            }
            self.note("receive".into());
            Ok(if n == 2 {
                vec![Message {
                    id: "m-1".into(),
                    receipt: "r-1".into(),
                    body: "not a lifecycle message".into(),
                    receive_count: 1,
                }]
            } else {
                Vec::new()
            })
        }
        async fn delete_batch(&self, receipts: &[String]) -> Result<BatchResult, AwsError> {
            self.note(format!("delete {}", receipts.join(",")));
            Ok(vec![Ok(()); receipts.len()])
        }
        async fn change_visibility_batch(
            &self,
            entries: &[(String, Duration)],
        ) -> Result<BatchResult, AwsError> {
            for (receipt, delay) in entries {
                self.note(format!("release {receipt} after {delay:?}"));
            }
            Ok(vec![Ok(()); entries.len()])
        }
        async fn redrive_policy(&self) -> Result<Option<String>, AwsError> {
            if !self.role_assumed() {
                self.note("redrive refused".into());
                return Err(refused("sqs:GetQueueAttributes"));
            }
            self.note("redrive".into());
            Ok(Some(r#"{"deadLetterTargetArn":"arn:aws:sqs:eu-west-1:210987654321:dlq","maxReceiveCount":"3"}"#.into()))
        }
    }

    fn pipeline(cfg: &Arc<Config>, queue: Arc<MemberQueue>) -> Arc<Pipeline> {
        let hooks = Arc::new(FakeHooks::default());
        let stats = Arc::new(Stats::default());
        let leases = Leases::spawn(
            Some(queue),
            hooks.clone(),
            cfg.queue.visibility_timeout,
            stats.clone(),
        );
        Arc::new(Pipeline::new(Parts {
            cfg: cfg.clone(),
            hooks,
            services: Services {
                instances: Arc::new(FakeInstances::default()),
                ssm: Arc::new(Unused),
                opsworks: Arc::new(Unused),
                ecs: Arc::new(Unused),
            },
            store: Store::in_memory().unwrap(),
            claims: None,
            leases,
            publisher: None,
            stats,
            remote: None,
            ansible: None,
        }))
    }

    /// `on_reject = "auto"` for a source whose queue cannot be read at first: its redrive
    /// policy is read once a receive succeeded, so a message nobody can handle goes to the
    /// dead-letter queue (released) instead of being deleted.
    #[tokio::test]
    async fn a_sources_dead_letter_queue_is_read_once_its_queue_answers() {
        let cfg = Arc::new(Config::parse(CONFIG, "t").unwrap());
        assert_eq!(cfg.queue.on_reject, OnReject::Auto);
        let queue = Arc::new(MemberQueue::default());
        let settings = Settings {
            max_in_flight: 4,
            wait_time: cfg.queue.wait_time,
            visibility_timeout: cfg.queue.visibility_timeout,
            shutdown_grace: cfg.daemon.shutdown_grace,
            retry_for: cfg.aws.retry_for,
            reject: RejectRule::new(cfg.queue.on_reject),
        };
        let never = CancellationToken::new();
        let summary = run(
            pipeline(&cfg, queue.clone()),
            queue.clone(),
            settings,
            Mode::Drain,
            &never,
            &never,
        )
        .await;
        assert_eq!(
            (summary.received, summary.receive_errors),
            (1, 1),
            "{summary:?}"
        );
        let calls = queue.calls.lock().unwrap().clone();
        assert_eq!(
            calls
                .iter()
                .filter(|c| c.starts_with("redrive"))
                .collect::<Vec<_>>(),
            ["redrive"],
            "read once, after the first receive that succeeded: {calls:?}"
        );
        assert!(
            calls.contains(&"release r-1 after 0ns".to_string())
                && !calls.iter().any(|c| c.starts_with("delete")),
            "rejected: left for the dead-letter queue, not deleted: {calls:?}"
        );
    }
}

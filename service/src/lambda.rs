//! AWS Lambda mode: the daemon's pipeline run as a function with an SQS trigger.
//!
//! Owns what differs from the daemon. Records arrive in the invocation's SQS event instead
//! of from ReceiveMessage, and are worked by the same [`Engine`] (at most
//! `queue.max_in_flight` at once). A handled record is a success: the event source mapping
//! deletes it, provision never does. A record whose outcome wants it back is released with
//! the delivery's delay (ChangeMessageVisibility) and listed in `batchItemFailures`, so only
//! it comes back. The invocation's deadline takes
//! the place of SIGTERM: shortly before it, unfinished records are cancelled (released and
//! reported as failures) instead of Lambda killing the function in the middle of a step.
//! Everything else (pipeline, leases, result publisher, store) is built by [`App::build`],
//! exactly as for the daemon.
//!
//! What the deployment must provide, checked at start where it can be (a failed check is
//! posted to the Runtime API's `/runtime/init/error` and the process exits non-zero):
//! - no layer may use a step kind that needs SSH ([`allowed_in_lambda`]);
//! - `state.path` must be writable: in Lambda only `/tmp` is, so point it there
//!   (`state.path = "/tmp/provision-state.db"`). The history is then per execution
//!   environment and lost when it is recycled; the result topic (`[notify]`) is the lasting
//!   record. Claims should be in a table the environments share (`state.claims_table`,
//!   [`crate::claims`]): without one each environment knows only its own, and a duplicate
//!   handed to two environments at once is worked twice (safe, since steps repeat safely and
//!   a finished action answers "no active action", but wasteful);
//! - not checkable here: the event source mapping must have `FunctionResponseTypes =
//!   ["ReportBatchItemFailures"]`, otherwise Lambda ignores `batchItemFailures` and deletes
//!   the whole batch; `queue.url` must name the trigger queue (receipt handles are used with
//!   it), and `queue.visibility_timeout` should equal the queue's VisibilityTimeout.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use lambda_runtime::{service_fn, LambdaEvent};
use tokio::time::Instant;
use tracing::{error, info, info_span, warn, Instrument};

use crate::app::App;
use crate::aws::{Message, Queue};
use crate::config::Config;
use crate::daemon::Settings;
use crate::delivery::{Acks, Deleter, Delivery, Settled};
use crate::engine::Engine;
use crate::outcome::Outcome;
use crate::pipeline::Pipeline;
use crate::step::StepKind;

/// Unfinished records are cancelled when this much of the invocation is left.
const CANCEL_MARGIN: Duration = Duration::from_secs(10);
/// Records still unfinished (a completion still retrying) are given up when this much is
/// left, so the response reaches Lambda before the deadline.
const GIVE_UP_MARGIN: Duration = Duration::from_secs(2);
/// How long releasing the failed records may keep retrying.
const RELEASE_RETRY_FOR: Duration = Duration::from_secs(5);

/// What `lambda_runtime` reads from the environment (it panics when one is missing).
const RUNTIME_ENV: [&str; 4] = [
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
];

/// Whether a step kind can run inside Lambda: only steps that talk to AWS APIs can; steps
/// that need an SSH connection to the instance (network path, keys, an ansible install)
/// cannot. Every kind must be classified here (the match is exhaustive on purpose).
pub fn allowed_in_lambda(kind: &StepKind) -> bool {
    match kind {
        StepKind::Tag(_) | StepKind::Ssm(_) | StepKind::OpsWorks(_) | StepKind::EcsDrain(_) => true,
        // A Lambda has no ssh client, no ansible-playbook, and usually no route to
        // instances' private addresses.
        StepKind::Ansible(_) | StepKind::Ssh(_) => false,
    }
}

/// The steps `allowed` refuses, named by their config key and kind, in config order.
pub fn refused_steps(cfg: &Config, allowed: impl Fn(&StepKind) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    for layer in &cfg.layers {
        for (which, steps) in layer.step_lists() {
            for (i, step) in steps.iter().enumerate() {
                if !allowed(&step.kind) {
                    out.push(format!(
                        "layers.{}.{which}[{i}] ({})",
                        layer.name,
                        step.kind_name()
                    ));
                }
            }
        }
    }
    out
}

/// Fails when the state store's directory cannot be written.
pub fn check_state_path(path: &Path) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let probe = dir.join(format!(".provision-write-test-{}", std::process::id()));
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::File::create(&probe))
        .map(|_| {
            let _ = std::fs::remove_file(&probe);
        })
        .map_err(|e| {
            format!(
                "state.path = {:?}: cannot write in {} ({e}); in AWS Lambda only /tmp is writable: set state.path = \"/tmp/provision-state.db\"",
                path.display().to_string(),
                dir.display()
            )
        })
}

/// Every reason the config cannot run in Lambda, or Ok.
pub fn check(cfg: &Config) -> anyhow::Result<()> {
    let mut problems: Vec<String> = refused_steps(cfg, allowed_in_lambda)
        .into_iter()
        .map(|s| format!("{s}: this step kind needs SSH, which AWS Lambda cannot provide; run this layer with `provision daemon` on a host instead"))
        .collect();
    if let Err(e) = check_state_path(&cfg.state.path) {
        problems.push(e);
    }
    if cfg
        .sources
        .iter()
        .any(|s| s.name != crate::sources::DEFAULT_SOURCE)
    {
        problems.push("[sources.NAME]: a function serves the queue of its event source mapping, named by [queue] url; deploy one function per account and region instead".into());
    }
    if problems.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "this config cannot run in AWS Lambda:\n  - {}",
        problems.join("\n  - ")
    )
}

/// When to cancel unfinished records and when to stop waiting for them, as time before
/// the deadline. Short invocations get proportionally smaller margins.
pub fn margins(remaining: Duration) -> (Duration, Duration) {
    (
        CANCEL_MARGIN.min(remaining / 2),
        GIVE_UP_MARGIN.min(remaining / 10),
    )
}

/// Runs the function: checks the config, builds the pipeline, then serves invocations
/// from the Lambda Runtime API until the process is stopped. Startup problems are posted
/// to `/runtime/init/error` and returned.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let missing: Vec<&str> = RUNTIME_ENV
        .into_iter()
        .filter(|k| std::env::var_os(k).is_none_or(|v| v.is_empty()))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "`provision lambda` runs inside AWS Lambda, and {} is not set; use `provision daemon` or `provision worker` elsewhere",
            missing.join(", ")
        );
    }
    let handler = match start(cfg).await {
        Ok(h) => Arc::new(h),
        Err(e) => {
            report_init_error(&format!("{e:#}")).await;
            return Err(e);
        }
    };
    info!(
        max_in_flight = handler.max_in_flight,
        "provision started in AWS Lambda"
    );
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let handler = handler.clone();
        async move {
            let (event, context) = event.into_parts();
            let remaining = context
                .deadline()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            // Every log line of the invocation carries its request id.
            let span = info_span!("invocation", request_id = %context.request_id);
            let response = handler
                .handle(event.records, remaining)
                .instrument(span)
                .await;
            Ok::<_, std::convert::Infallible>(response)
        }
    }))
    .await
    .map_err(|e| anyhow::anyhow!("the Lambda runtime stopped: {e}"))
}

async fn start(cfg: Config) -> anyhow::Result<Handler> {
    check(&cfg)?;
    let queue_url = cfg.queue.url.clone();
    let app = App::build(cfg).await?;
    // The function's own queue, read with its own role: its dead-letter setup is known
    // before the first invocation.
    app.settings.reject.decide(app.queue.as_ref()).await;
    Ok(Handler::new(
        app.pipeline.clone(),
        app.queue.clone(),
        &app.settings,
        &queue_url,
    ))
}

/// Tells Lambda why the function cannot start (POST /runtime/init/error). Best effort: the
/// caller also returns the error, so the process prints it and exits non-zero.
pub async fn report_init_error(message: &str) {
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_none() {
        return;
    }
    let body = serde_json::json!({
        "errorMessage": message,
        "errorType": "Runtime.InitError",
        "stackTrace": [],
    });
    let request = lambda_runtime_api_client::build_request()
        .method("POST")
        .uri("/2018-06-01/runtime/init/error")
        .header("Lambda-Runtime-Function-Error-Type", "Runtime.InitError")
        .header("Content-Type", "application/json")
        .body(lambda_runtime_api_client::body::Body::from(
            body.to_string(),
        ));
    let sent = match (
        request,
        lambda_runtime_api_client::Client::builder().build(),
    ) {
        (Ok(req), Ok(client)) => {
            match tokio::time::timeout(Duration::from_secs(5), client.call(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
                Ok(Ok(resp)) => Err(format!("HTTP {}", resp.status())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_string()),
            }
        }
        (Err(e), _) => Err(e.to_string()),
        (_, Err(e)) => Err(e.to_string()),
    };
    if let Err(e) = sent {
        warn!(error = %e, "could not report the init error to the Lambda Runtime API");
    }
}

/// Handles the records of one invocation.
pub struct Handler {
    pipeline: Arc<Pipeline>,
    /// Releases only: the event source mapping deletes what is reported handled.
    acks: Arc<Acks>,
    max_in_flight: usize,
    /// The last part of `queue.url`, to spot records from another queue.
    queue_name: String,
}

impl Handler {
    pub fn new(
        pipeline: Arc<Pipeline>,
        queue: Arc<dyn Queue>,
        settings: &Settings,
        queue_url: &str,
    ) -> Handler {
        let acks = Acks::spawn(
            queue,
            RELEASE_RETRY_FOR,
            Deleter::EventSource,
            settings.reject.clone(),
        );
        Handler {
            pipeline,
            acks: Arc::new(acks),
            max_in_flight: settings.max_in_flight.max(1),
            queue_name: queue_url
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string(),
        }
    }

    /// Works the records (concurrently) and answers which of them must come back.
    /// `remaining` is the time left before the invocation's deadline.
    pub async fn handle(&self, records: Vec<SqsMessage>, remaining: Duration) -> SqsBatchResponse {
        let started = Instant::now();
        let (cancel_margin, give_up_margin) = margins(remaining);
        let cancel_at = started + remaining.saturating_sub(cancel_margin);
        let give_up_at = started + remaining.saturating_sub(give_up_margin);

        // Result events that could not be published earlier in this environment.
        let outbox = {
            let pipeline = self.pipeline.clone();
            tokio::spawn(async move {
                pipeline.republish().await;
            })
        };

        let messages = self.messages(records);
        info!(
            records = messages.len(),
            remaining_ms = remaining.as_millis() as u64,
            "invocation"
        );

        let handled = self.work(&messages, started, cancel_at, give_up_at).await;

        let mut response = SqsBatchResponse::default();
        for (msg, ok) in messages.iter().zip(&handled) {
            if !ok {
                response.add_failure(msg.id.clone());
            }
        }
        let until_give_up = give_up_at.saturating_duration_since(Instant::now());
        let mut outbox = outbox;
        if tokio::time::timeout(until_give_up, &mut outbox)
            .await
            .is_err()
        {
            // Stopped, not left running: frozen with the environment, it would resume in a
            // later invocation and publish again what that invocation's outbox publishes.
            outbox.abort();
            let _ = outbox.await;
            warn!(
                "no time left to republish earlier result events; stopped, the next invocation tries again"
            );
        }
        info!(
            records = messages.len(),
            succeeded = messages.len() - response.batch_item_failures.len(),
            failed = response.batch_item_failures.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "invocation done"
        );
        response
    }

    /// The records as messages, warning once about records from another queue.
    fn messages(&self, records: Vec<SqsMessage>) -> Vec<Message> {
        let mut foreign = None;
        let messages = records
            .into_iter()
            .filter_map(|r| {
                if let Some(arn) = &r.event_source_arn {
                    if arn.rsplit(':').next() != Some(self.queue_name.as_str()) {
                        foreign.get_or_insert_with(|| arn.clone());
                    }
                }
                to_message(r)
            })
            .collect();
        if let Some(arn) = foreign {
            warn!(event_source = %arn, queue = %self.queue_name,
                "records come from another queue than queue.url names: extending and releasing them will fail");
        }
        messages
    }

    /// Works every message in the engine; says which were handled (false: it comes back,
    /// released now or when its visibility lapses).
    async fn work(
        &self,
        messages: &[Message],
        received: Instant,
        cancel_at: Instant,
        give_up_at: Instant,
    ) -> Vec<bool> {
        let mut engine = Engine::new(self.max_in_flight);
        for (i, msg) in messages.iter().enumerate() {
            let delivery = Delivery::new(msg.clone(), received, self.pipeline.leases());
            let (pipeline, acks) = (self.pipeline.clone(), self.acks.clone());
            engine.queue(move |cancel| async move {
                let outcome = match cancel {
                    Some(cancel) => pipeline.handle(&delivery, &cancel).await,
                    // Never started: it goes back at once, for another invocation.
                    None => Outcome::Released,
                };
                (i, acks.settle(delivery, outcome).await)
            });
        }
        let mut handled = vec![false; messages.len()];
        let why =
            "the invocation's deadline is near: cancelling unfinished records, they will come back";
        for done in engine.finish(cancel_at, Some(give_up_at), why).await {
            match done {
                Ok((i, settled)) => handled[i] = settled == Settled::Handled,
                Err(e) if e.is_cancelled() => {}
                Err(e) => error!(error = %e, "record task failed; the record will come back"),
            }
        }
        handled
    }
}

/// One SQS record as the pipeline's message. A record without a message id cannot be
/// reported either way; it is logged and left to the event source mapping.
fn to_message(r: SqsMessage) -> Option<Message> {
    let Some(id) = r.message_id else {
        error!("SQS record without a messageId; ignoring it");
        return None;
    };
    Some(Message {
        id,
        receipt: r.receipt_handle.unwrap_or_default(),
        body: r.body.unwrap_or_default(),
        receive_count: r
            .attributes
            .get("ApproximateReceiveCount")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use crate::aws::fake::{FakeHooks, FakeInstances, Unused};
    use crate::aws::{AwsError, BatchResult, Services};
    use crate::delivery::RejectPolicy;
    use crate::lease::Leases;
    use crate::metrics::Stats;
    use crate::pipeline::Parts;
    use crate::store::Store;

    const CONFIG: &str = r#"
[queue]
url = "https://sqs.us-east-1.amazonaws.com/123456789012/lifecycle"
[state]
path = "unused"
[aws]
retry_for = "1s"
[layers.web]
groups = ["web-*"]
vars = { role = "[a-z]+" }
launch = [
  { tag = { Name = "web-{instance_id}" } },
  { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["/opt/configure {metadata.role}"] } } },
]
terminate = [ { opsworks = { stack = "s", layer = "app", region = "us-east-1" } } ]
[layers.tags]
groups = ["tags-*"]
launch = [ { tag = { Name = "t-{instance_id}" } } ]
"#;

    #[test]
    fn every_step_kind_that_exists_today_may_run_in_lambda() {
        let cfg = Config::parse(CONFIG, "t").unwrap();
        assert!(refused_steps(&cfg, allowed_in_lambda).is_empty());
        // The report names each refused step by key and kind.
        let refused = refused_steps(&cfg, |k| matches!(k, StepKind::Tag(_)));
        assert_eq!(
            refused,
            [
                "layers.web.launch[1] (ssm)",
                "layers.web.terminate[0] (opsworks)"
            ]
        );
    }

    #[test]
    fn the_state_directory_must_be_writable() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_state_path(&dir.path().join("sub/state.db")).is_ok());
        let file = dir.path().join("plain-file");
        std::fs::write(&file, "x").unwrap();
        let e = check_state_path(&file.join("state.db")).unwrap_err();
        assert!(e.contains("state.path") && e.contains("/tmp"), "{e}");

        let mut cfg = Config::parse(CONFIG, "t").unwrap();
        cfg.state.path = file.join("state.db");
        let e = format!("{:#}", check(&cfg).unwrap_err());
        assert!(
            e.contains("cannot run in AWS Lambda") && e.contains("state.path"),
            "{e}"
        );
    }

    #[test]
    fn a_function_serves_its_own_queue_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::parse(CONFIG, "t").unwrap();
        cfg.state.path = dir.path().join("state.db");
        assert!(check(&cfg).is_ok());
        cfg.sources.push(crate::sources::SourceConfig {
            name: "eu".into(),
            url: "https://sqs.eu-west-1.amazonaws.com/210987654321/q".into(),
            region: Some("eu-west-1".into()),
            role: None,
        });
        let e = format!("{:#}", check(&cfg).unwrap_err());
        assert!(e.contains("[sources.NAME]"), "{e}");
    }

    #[test]
    fn margins_shrink_for_short_invocations() {
        assert_eq!(
            margins(Duration::from_secs(900)),
            (Duration::from_secs(10), Duration::from_secs(2))
        );
        assert_eq!(
            margins(Duration::from_secs(4)),
            (Duration::from_secs(2), Duration::from_millis(400))
        );
        assert_eq!(margins(Duration::ZERO), (Duration::ZERO, Duration::ZERO));
    }

    /// Records releases; nothing else is expected.
    #[derive(Default)]
    struct ReleaseLog(Mutex<Vec<(String, Duration)>>);

    #[async_trait]
    impl Queue for ReleaseLog {
        async fn receive(
            &self,
            _: u32,
            _: Duration,
            _: Duration,
        ) -> Result<Vec<Message>, AwsError> {
            panic!("Lambda never receives")
        }
        async fn delete_batch(&self, _: &[String]) -> Result<BatchResult, AwsError> {
            panic!("Lambda never deletes: the event source mapping does")
        }
        async fn change_visibility_batch(
            &self,
            entries: &[(String, Duration)],
        ) -> Result<BatchResult, AwsError> {
            self.0.lock().unwrap().extend_from_slice(entries);
            Ok(vec![Ok(()); entries.len()])
        }
        async fn redrive_policy(&self) -> Result<Option<String>, AwsError> {
            Ok(None)
        }
    }

    struct World {
        handler: Handler,
        hooks: Arc<FakeHooks>,
        queue: Arc<ReleaseLog>,
    }

    fn world(
        hooks: FakeHooks,
        instances: FakeInstances,
        reject: RejectPolicy,
        max_in_flight: usize,
    ) -> World {
        world_with(CONFIG, hooks, instances, reject, max_in_flight)
    }

    fn world_with(
        config: &str,
        hooks: FakeHooks,
        instances: FakeInstances,
        reject: RejectPolicy,
        max_in_flight: usize,
    ) -> World {
        let cfg = Arc::new(Config::parse(config, "t").unwrap());
        let hooks = Arc::new(hooks);
        let queue = Arc::new(ReleaseLog::default());
        let stats = Arc::new(Stats::default());
        let leases = Leases::spawn(
            Some(queue.clone()),
            hooks.clone(),
            Duration::from_secs(30),
            stats.clone(),
        );
        let pipeline = Pipeline::new(Parts {
            cfg: cfg.clone(),
            hooks: hooks.clone(),
            services: Services {
                instances: Arc::new(instances),
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
        });
        World {
            handler: Handler::new(
                Arc::new(pipeline),
                queue.clone(),
                &Settings {
                    max_in_flight,
                    wait_time: cfg.queue.wait_time,
                    visibility_timeout: cfg.queue.visibility_timeout,
                    shutdown_grace: cfg.daemon.shutdown_grace,
                    retry_for: cfg.aws.retry_for,
                    reject: crate::delivery::RejectRule::fixed(reject),
                },
                &cfg.queue.url,
            ),
            hooks,
            queue,
        }
    }

    fn record(id: &str, body: &str) -> SqsMessage {
        let mut r = SqsMessage::default();
        r.message_id = Some(id.into());
        r.receipt_handle = Some(format!("receipt-{id}"));
        r.body = Some(body.into());
        r.attributes
            .insert("ApproximateReceiveCount".into(), "1".into());
        r.event_source_arn = Some("arn:aws:sqs:us-east-1:123456789012:lifecycle".into());
        r
    }

    impl World {
        /// A record of a genuine launch: the instance waits in group tags-1.
        fn launch(&self, id: &str, instance: &str) -> SqsMessage {
            self.hooks.waiting(instance, "tags-1", "");
            launch(id, instance)
        }
    }

    fn launch(id: &str, instance: &str) -> SqsMessage {
        let body = serde_json::json!({
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "AutoScalingGroupName": "tags-1", "LifecycleHookName": "launch",
            "EC2InstanceId": instance, "LifecycleActionToken": format!("token-{id}"),
        });
        record(id, &body.to_string())
    }

    fn failures(r: &SqsBatchResponse) -> Vec<&str> {
        r.batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect()
    }

    const TEST_NOTIFICATION: &str =
        r#"{"Event":"autoscaling:TEST_NOTIFICATION","AutoScalingGroupName":"tags-1"}"#;

    #[tokio::test]
    async fn handled_records_are_successes_and_nothing_is_deleted_or_released() {
        let w = world(
            FakeHooks::default(),
            FakeInstances::default(),
            RejectPolicy::Delete,
            4,
        );
        let records = vec![
            w.launch("a", "i-0000000000000000a"),
            w.launch("b", "i-0000000000000000b"),
            record("bad", "not json"),
            record("test", TEST_NOTIFICATION),
        ];
        let r = w.handler.handle(records, Duration::from_secs(60)).await;
        assert!(failures(&r).is_empty(), "{r:?}");
        assert_eq!(w.hooks.completions.lock().unwrap().len(), 2);
        assert!(w.queue.0.lock().unwrap().is_empty());
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({ "batchItemFailures": [] })
        );
    }

    #[tokio::test]
    async fn with_a_dead_letter_queue_a_reject_fails_so_the_redrive_policy_moves_it() {
        let w = world(
            FakeHooks::default(),
            FakeInstances::default(),
            RejectPolicy::DeadLetter,
            4,
        );
        let records = vec![
            w.launch("a", "i-0000000000000000a"),
            record("bad", "not json"),
        ];
        let r = w.handler.handle(records, Duration::from_secs(60)).await;
        assert_eq!(failures(&r), ["bad"]);
        assert_eq!(
            *w.queue.0.lock().unwrap(),
            [("receipt-bad".to_string(), Duration::ZERO)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_completion_that_keeps_failing_is_released_with_a_delay_and_reported() {
        let hooks = FakeHooks::default();
        hooks.throttle_completions(100);
        let w = world(hooks, FakeInstances::default(), RejectPolicy::Delete, 4);
        let r = w
            .handler
            .handle(
                vec![w.launch("a", "i-0000000000000000a")],
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(failures(&r), ["a"]);
        let released = w.queue.0.lock().unwrap();
        assert_eq!(released.len(), 1);
        assert!(released[0].1 > Duration::ZERO, "{released:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn records_unfinished_near_the_deadline_are_cancelled_and_reported() {
        let instances = FakeInstances {
            delay: Duration::from_secs(100),
            ..Default::default()
        };
        // One slot: the second record never starts.
        let w = world(FakeHooks::default(), instances, RejectPolicy::Delete, 1);
        let records = vec![
            w.launch("a", "i-0000000000000000a"),
            w.launch("b", "i-0000000000000000b"),
        ];
        let t0 = Instant::now();
        let r = w.handler.handle(records, Duration::from_secs(30)).await;
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_secs(20) && took < Duration::from_secs(28),
            "{took:?}"
        );
        let mut f = failures(&r);
        f.sort();
        assert_eq!(f, ["a", "b"]);
        assert!(w.hooks.completions.lock().unwrap().is_empty());
        let calls = w.queue.0.lock().unwrap();
        // While "a" ran, its lease extended its visibility (half of the 30 s had passed).
        assert!(
            calls.contains(&("receipt-a".to_string(), Duration::from_secs(30))),
            "{calls:?}"
        );
        let mut released: Vec<&str> = calls
            .iter()
            .filter(|(_, d)| d.is_zero())
            .map(|(r, _)| r.as_str())
            .collect();
        released.sort();
        assert_eq!(released, ["receipt-a", "receipt-b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_completion_still_retrying_at_the_deadline_is_given_up_and_reported() {
        let hooks = FakeHooks::default();
        hooks.throttle_completions(1000);
        // Completion would keep retrying for an hour: it stops when the invocation's
        // deadline nears, and the record is reported before the deadline.
        let config = CONFIG.replace("retry_for = \"1s\"", "retry_for = \"1h\"");
        let w = world_with(
            &config,
            hooks,
            FakeInstances::default(),
            RejectPolicy::Delete,
            4,
        );
        let t0 = Instant::now();
        let r = w
            .handler
            .handle(
                vec![w.launch("a", "i-0000000000000000a")],
                Duration::from_secs(30),
            )
            .await;
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(30), "{took:?}");
        assert_eq!(failures(&r), ["a"]);
        // Not released: it was never finished, it comes back when its visibility lapses.
        assert!(
            w.queue.0.lock().unwrap().iter().all(|(_, d)| !d.is_zero()),
            "{:?}",
            w.queue.0.lock().unwrap()
        );
    }
}

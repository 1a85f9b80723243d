//! The `ssm` step: Run Command on the instance, for fleets the ops host cannot reach by SSH.
//!
//! ```toml
//! { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["systemctl restart app"] }, timeout = "10m" } }
//! ```
//!
//! Each instance first waits until its agent is Online (one DescribeInstanceInformation
//! for up to 50 waiting instances per poll, shared by every event). Instances that reach
//! the same command within `ssm.batch_window` share one SendCommand (up to 50, AWS's
//! limit); the command's invocations are then polled with ListCommandInvocations (one call
//! a page of 50, not one call per instance), with backoff, until each is terminal. Past
//! the step's `timeout` the command is cancelled for the instances still running it.
//! Parameter values are templates; metadata only reaches them through the layer's declared
//! `vars`. Repeating the step runs the document again: documents should be idempotent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::aws::{Invocation, InvocationStatus, Ssm as SsmApi, SsmCommand};
use crate::event::InstanceId;
use crate::poll::Pace;
use crate::retry::with_backoff;
use crate::setting::{parse_duration, ConfigError, Fields};
use crate::template::{Template, Vars};

use super::gather::Left;
use super::{require_declared, tail, StepContext, StepError, StepOutput};

/// SendCommand takes at most 50 instance ids.
pub const MAX_TARGETS: usize = 50;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_ONLINE_TIMEOUT: Duration = Duration::from_secs(600);
const POLL_FIRST: Duration = Duration::from_secs(1);
const POLL_MAX: Duration = Duration::from_secs(10);
const EXCERPT: usize = 1000;

#[derive(Debug, Clone)]
pub struct Ssm {
    document: String,
    parameters: Vec<(String, Vec<Template>)>,
    /// How long the command may run before it is cancelled.
    pub timeout: Duration,
    /// How long to wait for the agent to come Online.
    pub online_timeout: Duration,
    delivery_timeout: Option<i32>,
    comment: Option<String>,
    output_s3_bucket: Option<String>,
    output_s3_prefix: Option<String>,
    cloudwatch_log_group: Option<String>,
}

/// Instances share a SendCommand only when everything sent is identical.
pub type BatchKey = (SsmCommand, Duration);

/// `parameters = { NAME = "value" or ["values"] }`: each value a template.
fn parameters(f: &mut Fields<'_>, vars: &Vars) -> Vec<(String, Vec<Template>)> {
    let mut parameters = Vec::new();
    let Some(p) = f.with("parameters", |v| {
        v.as_table()
            .ok_or_else(|| "must be a table of parameter names to values".to_string())
    }) else {
        return parameters;
    };
    for (name, v) in p {
        let pk = format!("{}.{name}", f.key("parameters"));
        let values: Vec<&str> = match v {
            toml::Value::String(s) => vec![s.as_str()],
            toml::Value::Array(a) if a.iter().all(|x| x.is_str()) => {
                a.iter().filter_map(|x| x.as_str()).collect()
            }
            _ => {
                f.errors().push(ConfigError::new(
                    &pk,
                    "must be a string or a list of strings",
                ));
                continue;
            }
        };
        let mut templates = Vec::new();
        for (i, v) in values.iter().enumerate() {
            match Template::parse(v) {
                Ok(t) => {
                    let declared = require_declared(&t, &format!("{pk}[{i}]"), vars);
                    f.errors().extend(declared);
                    templates.push(t);
                }
                Err(e) => f
                    .errors()
                    .push(ConfigError::new(format!("{pk}[{i}]"), e.to_string())),
            }
        }
        parameters.push((name.clone(), templates));
    }
    parameters
}

/// An optional non-empty string.
fn text<'a>(f: &mut Fields<'a>, k: &'a str) -> Option<String> {
    f.non_empty(k).map(str::to_string)
}

/// `delivery_timeout`: SendCommand's TimeoutSeconds, 30 s to 30 days.
fn delivery_timeout(v: &toml::Value) -> Result<i32, String> {
    match v.as_str().map(parse_duration) {
        Some(Ok(d)) if (30..=2_592_000).contains(&d.as_secs()) => Ok(d.as_secs() as i32),
        _ => Err("must be a duration from 30s to 30 days".to_string()),
    }
}

impl Ssm {
    pub fn parse(value: &toml::Value, key: &str, vars: &Vars) -> Result<Ssm, Vec<ConfigError>> {
        let t = value.as_table().ok_or_else(|| {
            vec![ConfigError::new(
                key,
                "must be a table: { document = \"...\", parameters = { ... } }",
            )]
        })?;
        let mut errs = Vec::new();
        let mut f = Fields::new(Some(t), key, &mut errs);
        let document = text(&mut f, "document").unwrap_or_else(|| {
            f.error(
                "document",
                "missing: an SSM document name, e.g. \"AWS-RunShellScript\"",
            );
            String::new()
        });
        let ssm = Ssm {
            document,
            parameters: parameters(&mut f, vars),
            timeout: f.timeout("timeout", "10m").unwrap_or(DEFAULT_TIMEOUT),
            online_timeout: f
                .timeout("online_timeout", "10m")
                .unwrap_or(DEFAULT_ONLINE_TIMEOUT),
            delivery_timeout: f.with("delivery_timeout", delivery_timeout),
            comment: text(&mut f, "comment"),
            output_s3_bucket: text(&mut f, "output_s3_bucket"),
            output_s3_prefix: text(&mut f, "output_s3_prefix"),
            cloudwatch_log_group: text(&mut f, "cloudwatch_log_group"),
        };
        f.finish("unknown key for an ssm step");
        if errs.is_empty() {
            Ok(ssm)
        } else {
            Err(errs)
        }
    }

    pub fn describe(&self) -> String {
        let params: Vec<String> = self
            .parameters
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={:?}",
                    v.iter().map(Template::source).collect::<Vec<_>>()
                )
            })
            .collect();
        format!("ssm {} {}", self.document, params.join(" "))
    }

    /// The command for one event (templates filled in and validated).
    pub fn command(&self, ctx: &crate::template::Context<'_>) -> Result<SsmCommand, StepError> {
        let mut parameters = BTreeMap::new();
        for (name, templates) in &self.parameters {
            let values = templates
                .iter()
                .map(|t| t.render(ctx).map_err(|e| StepError::Input(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            parameters.insert(name.clone(), values);
        }
        Ok(SsmCommand {
            document: self.document.clone(),
            parameters,
            timeout_seconds: self.delivery_timeout,
            comment: self.comment.clone(),
            output_s3_bucket: self.output_s3_bucket.clone(),
            output_s3_prefix: self.output_s3_prefix.clone(),
            cloudwatch_log_group: self.cloudwatch_log_group.clone(),
        })
    }

    pub async fn run(&self, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let cmd = self.command(&ctx.template)?;
        let id = ctx.template.event.instance_id.clone();
        ctx.shared
            .ssm_online
            .wait(&id, self.online_timeout)
            .await
            .map_err(StepError::NotReady)?;
        info!("SSM agent is Online; joining the command batch");
        let (ssm, retry_for, timeout) = (ctx.services.ssm.clone(), ctx.retry_for, self.timeout);
        let key = (cmd.clone(), timeout);
        let result = ctx
            .shared
            .ssm_batches
            .join(key, id, move |ids, left| {
                run_batch(ssm, cmd, ids, left, timeout, retry_for)
            })
            .await
            .unwrap_or_else(|| Err("the command batch stopped unexpectedly".to_string()));
        result
            .map(|detail| StepOutput { detail })
            .map_err(StepError::Remote)
    }
}

/// One SendCommand for `ids`, polled to the end. One result per id, in order. Instances
/// whose step stopped waiting (`left`: shutdown, or their run lost its claim) get their
/// invocation cancelled at the next poll; a batch everyone left before it was sent sends
/// nothing.
async fn run_batch(
    ssm: Arc<dyn SsmApi>,
    cmd: SsmCommand,
    ids: Vec<InstanceId>,
    left: Left,
    timeout: Duration,
    retry_for: Duration,
) -> Vec<Result<String, String>> {
    const LEFT: &str = "the step stopped before its command ran";
    if left.all() {
        return vec![Err(LEFT.to_string()); ids.len()];
    }
    let (send_to, unsent) = still_waiting(&ids, &left);
    let deadline = Instant::now() + timeout;
    let command_id = match with_backoff(retry_for, || ssm.send_command(&cmd, &send_to)).await {
        Ok(c) => c,
        Err(e) => return vec![Err(format!("SendCommand failed: {e}")); ids.len()],
    };
    info!(command_id = %command_id, instances = ids.len(), document = %cmd.document, "sent SSM command");
    let mut latest: HashMap<String, Invocation> = HashMap::new();
    let mut pace = Pace::doubling(deadline, POLL_FIRST, POLL_MAX);
    let mut timed_out = Vec::new();
    let mut withdrawn: Vec<InstanceId> = Vec::new();
    loop {
        // A member whose step stopped is cancelled at once, not at the next poll.
        tokio::select! {
            () = pace.pause() => {}
            () = left.changed() => {}
        }
        match ssm.invocations(&command_id).await {
            Ok(list) => {
                for inv in list {
                    latest.insert(inv.instance_id.clone(), inv);
                }
            }
            Err(e) if e.retryable() => {
                warn!(error = %e, "cannot list command invocations yet; will retry")
            }
            Err(e) => return vec![Err(format!("command {command_id}: {e}")); ids.len()],
        }
        let running: Vec<InstanceId> = send_to
            .iter()
            .filter(|id| !latest.get(id.as_str()).is_some_and(Invocation::is_terminal))
            .filter(|id| !withdrawn.contains(id))
            .cloned()
            .collect();
        withdrawn.extend(withdraw(&*ssm, &command_id, &ids, &running, &left, retry_for).await);
        let running: Vec<InstanceId> = running
            .into_iter()
            .filter(|id| !withdrawn.contains(id))
            .collect();
        if running.is_empty() {
            break;
        }
        if pace.expired() {
            warn!(command_id = %command_id, instances = running.len(), "command timed out; cancelling it");
            if let Err(e) = with_backoff(retry_for, || ssm.cancel(&command_id, &running)).await {
                warn!(error = %e, "CancelCommand failed");
            }
            timed_out = running;
            break;
        }
    }
    ids.iter()
        .map(|id| {
            if unsent.contains(id) {
                return Err(LEFT.to_string());
            }
            if withdrawn.contains(id) {
                return Err(format!(
                    "command {command_id} cancelled on {id}: its step stopped"
                ));
            }
            if timed_out.contains(id) {
                return Err(format!(
                    "command {command_id} still running on {id} after {}; cancelled",
                    humantime::format_duration(timeout)
                ));
            }
            outcome(&command_id, &latest[id.as_str()])
        })
        .collect()
}

/// The members still waiting, and those who left: only the first are sent the command, so
/// a batch that runs late (its window's task frozen with a Lambda execution environment
/// and resumed in a later invocation) never sends it for runs that ended meanwhile.
fn still_waiting(ids: &[InstanceId], left: &Left) -> (Vec<InstanceId>, Vec<InstanceId>) {
    let (gone, waiting): (Vec<_>, Vec<_>) = ids.iter().enumerate().partition(|(i, _)| left.has(*i));
    let ids_of = |v: Vec<(usize, &InstanceId)>| v.into_iter().map(|(_, id)| id.clone()).collect();
    (ids_of(waiting), ids_of(gone))
}

/// Cancels the command for the members still running it whose steps stopped waiting;
/// returns them.
async fn withdraw(
    ssm: &dyn SsmApi,
    command_id: &str,
    ids: &[InstanceId],
    running: &[InstanceId],
    left: &Left,
    retry_for: Duration,
) -> Vec<InstanceId> {
    let gone: Vec<InstanceId> = (ids.iter().enumerate())
        .filter(|(i, id)| left.has(*i) && running.contains(id))
        .map(|(_, id)| id.clone())
        .collect();
    if !gone.is_empty() {
        warn!(command_id = %command_id, instances = gone.len(), "their steps stopped; cancelling the command for them");
        if let Err(e) = with_backoff(retry_for, || ssm.cancel(command_id, &gone)).await {
            warn!(error = %e, "CancelCommand failed");
        }
    }
    gone
}

/// An invocation's end, as the step reports it.
fn outcome(command_id: &str, inv: &Invocation) -> Result<String, String> {
    let code = inv
        .response_code
        .map(|c| format!(", exit {c}"))
        .unwrap_or_default();
    let out = tail(&inv.output, EXCERPT);
    if inv.status == InvocationStatus::Success {
        Ok(format!("command {command_id}: Success{code}\n{out}"))
    } else {
        Err(format!(
            "command {command_id}: {} ({}){code}\n{out}",
            inv.status, inv.status_details
        ))
    }
}

/// Waits for SSM agents to come Online: one poller for every waiting instance, asking about
/// up to 50 instances per DescribeInstanceInformation call.
pub struct OnlineWatch {
    ssm: Arc<dyn SsmApi>,
    state: Arc<Mutex<WatchState>>,
}

#[derive(Default)]
struct WatchState {
    waiting: HashMap<InstanceId, Vec<oneshot::Sender<()>>>,
    polling: bool,
    /// Set when someone new arrives, so the poller looks again soon.
    fresh: bool,
}

impl OnlineWatch {
    pub fn new(ssm: Arc<dyn SsmApi>) -> Self {
        OnlineWatch {
            ssm,
            state: Arc::new(Mutex::new(WatchState::default())),
        }
    }

    pub async fn wait(&self, id: &InstanceId, timeout: Duration) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state.lock().unwrap();
            st.waiting.entry(id.clone()).or_default().push(tx);
            st.fresh = true;
            if !st.polling {
                st.polling = true;
                tokio::spawn(poll(self.ssm.clone(), self.state.clone()));
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(format!(
                "{id} did not come Online in SSM within {} (is the agent installed, and does the instance profile allow SSM?)",
                humantime::format_duration(timeout)
            )),
        }
    }
}

async fn poll(ssm: Arc<dyn SsmApi>, state: Arc<Mutex<WatchState>>) {
    // Let a burst of arrivals gather, so they share the first call.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut delay = POLL_FIRST;
    loop {
        let ids: Vec<InstanceId> = {
            let mut st = state.lock().unwrap();
            // Waiters that gave up (timeout, shutdown) no longer count.
            st.waiting.retain(|_, txs| {
                txs.retain(|t| !t.is_closed());
                !txs.is_empty()
            });
            if st.waiting.is_empty() {
                st.polling = false;
                return;
            }
            if st.fresh {
                st.fresh = false;
                delay = POLL_FIRST;
            }
            st.waiting.keys().cloned().collect()
        };
        for chunk in ids.chunks(MAX_TARGETS) {
            match ssm.online(chunk).await {
                Ok(online) => {
                    let mut st = state.lock().unwrap();
                    for id in online {
                        if let Some(txs) = InstanceId::parse(&id)
                            .ok()
                            .and_then(|i| st.waiting.remove(&i))
                        {
                            for t in txs {
                                let _ = t.send(());
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot ask SSM which instances are Online; will retry")
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay.mul_f64(1.5)).min(POLL_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::AwsError;

    /// Records what is sent; every invocation it was sent succeeds at once.
    #[derive(Default)]
    struct Recording {
        sent: Mutex<Vec<Vec<String>>>,
        cancelled: Mutex<Vec<Vec<String>>>,
    }

    #[async_trait::async_trait]
    impl SsmApi for Recording {
        async fn online(&self, ids: &[InstanceId]) -> Result<Vec<String>, AwsError> {
            Ok(ids.iter().map(|i| i.to_string()).collect())
        }
        async fn send_command(
            &self,
            _: &SsmCommand,
            ids: &[InstanceId],
        ) -> Result<String, AwsError> {
            let ids = ids.iter().map(|i| i.to_string()).collect();
            self.sent.lock().unwrap().push(ids);
            Ok("c-1".to_string())
        }
        async fn invocations(&self, _: &str) -> Result<Vec<Invocation>, AwsError> {
            let sent = self.sent.lock().unwrap();
            Ok(sent
                .iter()
                .flatten()
                .map(|id| Invocation {
                    instance_id: id.clone(),
                    status: InvocationStatus::Success,
                    status_details: "Success".into(),
                    response_code: Some(0),
                    output: String::new(),
                })
                .collect())
        }
        async fn cancel(&self, _: &str, ids: &[InstanceId]) -> Result<(), AwsError> {
            let ids = ids.iter().map(|i| i.to_string()).collect();
            self.cancelled.lock().unwrap().push(ids);
            Ok(())
        }
        async fn parameter(&self, _: &str) -> Result<crate::secret::Secret, AwsError> {
            unreachable!("no parameter is read here")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_runs_late_sends_nothing_for_members_that_left() {
        let ssm = Arc::new(Recording::default());
        let cmd = SsmCommand {
            document: "AWS-RunShellScript".into(),
            parameters: Default::default(),
            timeout_seconds: None,
            comment: None,
            output_s3_bucket: None,
            output_s3_prefix: None,
            cloudwatch_log_group: None,
        };
        let ids: Vec<InstanceId> = ["i-0000000000000000a", "i-0000000000000000b"]
            .iter()
            .map(|i| InstanceId::parse(i).unwrap())
            .collect();
        // The first member's run ended before the batch ran (e.g. an invocation that was
        // cancelled, its environment frozen, the batch resumed in a later one).
        let left = Left::of(&[true, false]);
        let results = run_batch(
            ssm.clone(),
            cmd,
            ids,
            left,
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(
            *ssm.sent.lock().unwrap(),
            vec![vec!["i-0000000000000000b".to_string()]]
        );
        assert!(ssm.cancelled.lock().unwrap().is_empty());
        assert_eq!(
            results[0],
            Err("the step stopped before its command ran".into())
        );
        assert!(
            results[1].as_ref().unwrap().contains("Success"),
            "{results:?}"
        );
    }
}

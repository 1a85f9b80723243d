//! `provision lambda` against a fake Lambda Runtime API and the emulator: the real binary,
//! real SQS messages (received here with the SDK, so receipt handles are real) wrapped into
//! the SQS event Lambda's event source mapping would send.
//!
//! The fake Runtime API (https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html)
//! serves queued invocations on GET /2018-06-01/runtime/invocation/next, blocks that call
//! when none is queued, and records what the function posts to .../response, .../error and
//! /runtime/init/error. Each test stops the binary (its guard kills it) and the server.

use crate::common;

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use common::{
    eventually, wait_child, Aws, Emulator, Provision, Queue, Running, World, ACCOUNT, REGION,
};
use serde_json::{json, Value};

const METADATA: &str = r#"{"environment":"production","platform":"web","major":"3"}"#;

const WEB_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
on_failure = "abandon"
launch = [ { tag = { Name = "web-{instance_id}", Environment = "{metadata.environment}" } } ]
"#;

// ---------------------------------------------------------------------------------------
// The fake Lambda Runtime API
// ---------------------------------------------------------------------------------------

struct Invocation {
    id: String,
    deadline_ms: u128,
    body: String,
}

#[derive(Default)]
struct State {
    pending: VecDeque<Invocation>,
    /// request id -> ("response" | "error", body)
    answers: HashMap<String, (String, String)>,
    /// (Lambda-Runtime-Function-Error-Type header, body)
    init_errors: Vec<(String, String)>,
    closed: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

struct RuntimeApi {
    addr: SocketAddr,
    shared: Shared,
    accept: Option<JoinHandle<()>>,
}

impl RuntimeApi {
    fn start() -> RuntimeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared: Shared = Arc::default();
        let accept = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if shared.0.lock().unwrap().closed {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        let _ = serve_connection(stream, &shared);
                    });
                }
            })
        };
        RuntimeApi {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Queues an invocation with `event` as its payload; returns its request id.
    fn invoke(&self, event: &Value, time_limit: Duration) -> String {
        let id = format!("req-{:08x}", fastrand::u32(..));
        let deadline = SystemTime::now() + time_limit;
        let deadline_ms = deadline
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap().pending.push_back(Invocation {
            id: id.clone(),
            deadline_ms,
            body: event.to_string(),
        });
        cv.notify_all();
        id
    }

    /// What the function answered for an invocation: ("response" | "error", JSON body).
    fn answer(&self, id: &str, timeout: Duration) -> (String, Value) {
        let (lock, cv) = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut state = lock.lock().unwrap();
        loop {
            if let Some((kind, body)) = state.answers.get(id) {
                return (
                    kind.clone(),
                    serde_json::from_str(body).unwrap_or(Value::Null),
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no answer to {id} within {timeout:?}");
            state = cv.wait_timeout(state, left).unwrap().0;
        }
    }

    fn init_errors(&self) -> Vec<(String, String)> {
        self.shared.0.lock().unwrap().init_errors.clone()
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap().closed = true;
        cv.notify_all();
        // Wake the accept loop so it sees `closed`.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// One keep-alive connection: requests in order until the peer closes or the server does.
fn serve_connection(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let body = read_body(&mut reader, &headers)?;
        let (lock, cv) = &**shared;
        if method == "GET" && path == "/2018-06-01/runtime/invocation/next" {
            let mut state = lock.lock().unwrap();
            let inv = loop {
                if state.closed {
                    return Ok(());
                }
                if let Some(inv) = state.pending.pop_front() {
                    break inv;
                }
                state = cv
                    .wait_timeout(state, Duration::from_millis(200))
                    .unwrap()
                    .0;
            };
            drop(state);
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nLambda-Runtime-Aws-Request-Id: {}\r\n\
                 Lambda-Runtime-Deadline-Ms: {}\r\n\
                 Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:{REGION}:{ACCOUNT}:function:provision\r\n\
                 Lambda-Runtime-Trace-Id: Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=1\r\n\
                 Content-Length: {}\r\n\r\n{}",
                inv.id,
                inv.deadline_ms,
                inv.body.len(),
                inv.body
            )?;
            out.flush()?;
            continue;
        }
        let status = if method != "POST" {
            "404 Not Found"
        } else if path == "/2018-06-01/runtime/init/error" {
            let kind = headers
                .get("lambda-runtime-function-error-type")
                .cloned()
                .unwrap_or_default();
            lock.lock().unwrap().init_errors.push((kind, body));
            cv.notify_all();
            "202 Accepted"
        } else if let Some(rest) = path.strip_prefix("/2018-06-01/runtime/invocation/") {
            match rest.split_once('/') {
                Some((id, kind @ ("response" | "error"))) => {
                    lock.lock()
                        .unwrap()
                        .answers
                        .insert(id.to_string(), (kind.to_string(), body));
                    cv.notify_all();
                    "202 Accepted"
                }
                _ => "404 Not Found",
            }
        } else {
            "404 Not Found"
        };
        let reply = r#"{"status":"OK"}"#;
        write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        )?;
        out.flush()?;
    }
}

fn read_body(
    reader: &mut BufReader<TcpStream>,
    headers: &HashMap<String, String>,
) -> std::io::Result<String> {
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(std::io::Error::other)?;
            let mut chunk = vec![0; n + 2]; // data + CRLF
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = headers.get("content-length").and_then(|v| v.parse().ok()) {
        body.resize(n, 0);
        reader.read_exact(&mut body)?;
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The environment Lambda gives a function (the rest comes from `Provision::command`).
fn lambda_env(cmd: &mut Command, api: &RuntimeApi) {
    cmd.env("AWS_LAMBDA_RUNTIME_API", api.addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "provision")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/provision")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "test");
}

/// `provision lambda` in the background; killed when the guard drops.
fn start_lambda(p: &Provision, api: &RuntimeApi) -> Running {
    let log = p.dir.join(format!("lambda-{}.log", fastrand::u32(..)));
    let mut cmd = p.command(&["lambda"]);
    lambda_env(&mut cmd, api);
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Running { child, log }
}

/// Receives `n` messages (with their attributes), hidden for a minute.
async fn receive(aws: &Aws, q: &Queue, n: usize) -> Vec<aws_sdk_sqs::types::Message> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "received {} of {n} messages",
            got.len()
        );
        let r = aws
            .sqs
            .receive_message()
            .queue_url(&q.url)
            .max_number_of_messages((n - got.len()).min(10) as i32)
            .visibility_timeout(60)
            .wait_time_seconds(1)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        got.extend(r.messages.unwrap_or_default());
    }
    got
}

/// The SQS event Lambda's event source mapping sends for these messages.
fn sqs_event(q: &Queue, msgs: &[aws_sdk_sqs::types::Message]) -> Value {
    let records: Vec<Value> = msgs
        .iter()
        .map(|m| {
            let attributes: serde_json::Map<String, Value> = m
                .attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.as_str().to_string(), Value::from(v.as_str())))
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "messageId": m.message_id(),
                "receiptHandle": m.receipt_handle(),
                "body": m.body(),
                "attributes": attributes,
                "messageAttributes": {},
                "md5OfBody": m.md5_of_body(),
                "eventSource": "aws:sqs",
                "eventSourceARN": q.arn,
                "awsRegion": REGION,
            })
        })
        .collect();
    json!({ "Records": records })
}

fn failures(response: &Value) -> Vec<String> {
    response["batchItemFailures"]
        .as_array()
        .unwrap_or_else(|| panic!("not a batch response: {response}"))
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_string())
        .collect()
}

/// The message id of the launch message for `instance`.
fn message_for(msgs: &[aws_sdk_sqs::types::Message], instance: &str) -> String {
    msgs.iter()
        .find(|m| m.body().unwrap_or_default().contains(instance))
        .and_then(|m| m.message_id())
        .unwrap_or_else(|| panic!("no message for {instance}"))
        .to_string()
}

fn pending_instances(emu: &Emulator) -> Vec<String> {
    emu.actions()
        .into_iter()
        .filter(|a| a["state"] == "pending")
        .map(|a| a["instance_id"].as_str().unwrap().to_string())
        .collect()
}

fn calls(emu: &Emulator, name: &str) -> i64 {
    emu.calls().get(name).and_then(Value::as_i64).unwrap_or(0)
}

/// The answer to an invocation, which must be a response (not an invocation error).
fn response(api: &RuntimeApi, lambda: &Running, id: &str, timeout: Duration) -> Value {
    let (kind, body) = api.answer(id, timeout);
    assert_eq!(
        kind,
        "response",
        "invocation error {body}\n{}",
        lambda.log()
    );
    body
}

/// The group "web-prod" of `instances` instances, its launch hook notifying "lifecycle".
async fn launch_group(instances: i32) -> World {
    World::builder("web-prod")
        .metadata(METADATA)
        .instances(instances)
        .start()
        .await
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_launches_is_completed_published_and_reported_without_failures() {
    let World { emu, aws, q, .. } = launch_group(3).await;
    let (topic, results) = aws.topic_with_queue("results").await;
    aws.send(&q, "not json").await;
    // The hook's test notification, three launches, the bad message.
    let msgs = receive(&aws, &q, 5).await;

    let p = Provision::new(&emu, &q, Some(&topic), WEB_LAYER);
    let api = RuntimeApi::start();
    let lambda = start_lambda(&p, &api);
    let id = api.invoke(&sqs_event(&q, &msgs), Duration::from_secs(120));
    let r = response(&api, &lambda, &id, Duration::from_secs(60));
    assert_eq!(r, json!({ "batchItemFailures": [] }), "{}", lambda.log());

    // Lambda's event source mapping deletes successful records; the function must not.
    assert_eq!(calls(&emu, "sqs:DeleteMessage"), 0);
    assert_eq!(calls(&emu, "sqs:DeleteMessageBatch"), 0);
    assert_eq!(aws.approximate_messages(&q).await, (0, 5));
    // Result events were published before the invocation returned: read them right away.
    let events = aws.results(&results).await;
    assert_eq!(events.len(), 3, "{events:?}\n{}", lambda.log());
    assert!(events.iter().all(|e| e["hook_result"] == "CONTINUE"));

    let instances = aws.instances("web-prod").await;
    assert_eq!(instances.len(), 3);
    for (id, state) in &instances {
        assert_eq!(state, "InService", "{id}");
        assert_eq!(aws.tags(id).await.get("Name"), Some(&format!("web-{id}")));
    }
    let finished = emu.finished_actions();
    assert_eq!(finished.len(), 3);
    assert!(finished
        .iter()
        .all(|a| a["result"] == "CONTINUE" && a["completions"] == 1));
    let mut outcomes: Vec<String> = p
        .history()
        .into_iter()
        .map(|r| r.outcome.as_str().to_string())
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        ["rejected", "skipped", "succeeded", "succeeded", "succeeded"]
    );

    // The same batch again (a redelivery): every record is a success, nothing runs twice.
    let id = api.invoke(&sqs_event(&q, &msgs), Duration::from_secs(120));
    let r = response(&api, &lambda, &id, Duration::from_secs(60));
    assert_eq!(r, json!({ "batchItemFailures": [] }));
    assert!(emu.finished_actions().iter().all(|a| a["completions"] == 1));
    assert_eq!(calls(&emu, "ec2:CreateTags"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_environments_sharing_a_claims_table_work_a_duplicate_once() {
    let World { emu, aws, q, .. } = launch_group(3).await;
    let msgs = receive(&aws, &q, 4).await;
    common::claims_table(&aws, "provision-claims").await;
    // Slow steps: both environments hold the batch at the same time.
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": -1, "delay_seconds": 2}));

    // Two execution environments, each with its own /tmp, handed the same batch (SQS
    // delivers a message again while the first delivery is still being worked).
    let envs: Vec<_> = (0..2)
        .map(|_| {
            let p = Provision::new(&emu, &q, None, WEB_LAYER);
            p.share_claims("provision-claims", "6s");
            let api = RuntimeApi::start();
            let lambda = start_lambda(&p, &api);
            (p, api, lambda)
        })
        .collect();
    let ids: Vec<_> = envs
        .iter()
        .map(|(_, api, _)| api.invoke(&sqs_event(&q, &msgs), Duration::from_secs(120)))
        .collect();
    for ((_, api, lambda), id) in envs.iter().zip(&ids) {
        let r = response(api, lambda, id, Duration::from_secs(90));
        assert_eq!(r, json!({ "batchItemFailures": [] }), "{}", lambda.log());
    }

    assert_eq!(
        calls(&emu, "ec2:CreateTags"),
        3,
        "each action's steps ran once"
    );
    let finished = emu.finished_actions();
    assert_eq!(finished.len(), 3);
    assert!(finished
        .iter()
        .all(|a| a["result"] == "CONTINUE" && a["completions"] == 1));
    let mut outcomes: Vec<String> = envs
        .iter()
        .flat_map(|(p, _, _)| p.history())
        .map(|r| r.outcome.as_str().to_string())
        .filter(|o| o != "skipped")
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        [
            "duplicate",
            "duplicate",
            "duplicate",
            "succeeded",
            "succeeded",
            "succeeded"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_completion_fails_transiently_is_completed_within_the_invocation() {
    let World { emu, aws, q, .. } = launch_group(3).await;
    let msgs = receive(&aws, &q, 4).await;

    // One attempt per call (no SDK retries) and no backoff round: one of the three
    // concurrent completions meets a server error. It is tried again while its record is
    // in flight, not reported as a failure to come back and spend a receive.
    let p = Provision::new(
        &emu,
        &q,
        None,
        &format!("[aws]\nmax_attempts = 1\nretry_for = \"0s\"\n{WEB_LAYER}"),
    );
    emu.fault(json!({"service": "autoscaling", "action": "CompleteLifecycleAction", "count": 1, "error": "server"}));
    let api = RuntimeApi::start();
    let lambda = start_lambda(&p, &api);
    let id = api.invoke(&sqs_event(&q, &msgs), Duration::from_secs(120));
    let r = response(&api, &lambda, &id, Duration::from_secs(60));
    assert_eq!(r, json!({ "batchItemFailures": [] }), "{}", lambda.log());
    assert_eq!(calls(&emu, "autoscaling:CompleteLifecycleAction"), 4);
    let finished = emu.finished_actions();
    assert_eq!(finished.len(), 3);
    assert!(finished
        .iter()
        .all(|a| a["result"] == "CONTINUE" && a["completions"] == 1));
    assert_eq!(
        calls(&emu, "sqs:ChangeMessageVisibilityBatch"),
        0,
        "nothing released"
    );
    assert!(
        lambda.log().contains("the message stays in flight"),
        "{}",
        lambda.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_failing_until_the_deadline_is_reported_released_and_completed_later() {
    let World { emu, aws, q, .. } = launch_group(1).await;
    let msgs = receive(&aws, &q, 2).await;
    let p = Provision::new(
        &emu,
        &q,
        None,
        &format!("[aws]\nmax_attempts = 1\nretry_for = \"1s\"\n{WEB_LAYER}"),
    );
    emu.fault(json!({"service": "autoscaling", "action": "CompleteLifecycleAction", "count": -1, "error": "throttle"}));
    let api = RuntimeApi::start();
    let lambda = start_lambda(&p, &api);
    // Throttled for the whole invocation: at its deadline the record is reported.
    let id = api.invoke(&sqs_event(&q, &msgs), Duration::from_secs(10));
    let r = response(&api, &lambda, &id, Duration::from_secs(60));
    let pending = pending_instances(&emu);
    assert_eq!(pending.len(), 1, "{pending:?}\n{}", lambda.log());
    let failed = message_for(&msgs, &pending[0]);
    assert_eq!(failures(&r), [failed.as_str()], "{}", lambda.log());
    // Released with the pipeline's retry delay (seconds, not zero): still hidden.
    assert!(calls(&emu, "sqs:ChangeMessageVisibilityBatch") >= 1);
    assert_eq!(calls(&emu, "sqs:DeleteMessageBatch"), 0);
    assert_eq!(aws.approximate_messages(&q).await, (0, 2));
    let run = p
        .history()
        .into_iter()
        .find(|r| r.instance_id.as_deref() == Some(pending[0].as_str()))
        .unwrap();
    assert_eq!(run.outcome.as_str(), "retry", "{run:?}");
    assert_eq!(
        run.decision.map(|d| d.as_str()),
        Some("CONTINUE"),
        "{run:?}"
    );

    // It comes back in a later batch: only the completion is left to do.
    emu.control("DELETE", "/_emulator/faults", None);
    let again: Vec<_> = msgs
        .iter()
        .filter(|m| m.message_id() == Some(failed.as_str()))
        .cloned()
        .collect();
    let id = api.invoke(&sqs_event(&q, &again), Duration::from_secs(120));
    let r = response(&api, &lambda, &id, Duration::from_secs(60));
    assert_eq!(r, json!({ "batchItemFailures": [] }), "{}", lambda.log());
    assert!(pending_instances(&emu).is_empty());
    assert!(emu
        .finished_actions()
        .iter()
        .all(|a| a["result"] == "CONTINUE" && a["completions"] == 1));
    assert_eq!(calls(&emu, "ec2:CreateTags"), 1, "steps ran once");
    let last = p.history().into_iter().next().unwrap();
    assert_eq!(last.outcome.as_str(), "succeeded", "{last:?}");
    assert!(
        last.cause.as_deref().unwrap().starts_with("decided by run"),
        "{last:?}"
    );
}

/// Lambda freezes an execution environment between invocations (here: SIGSTOP after the
/// response, SIGCONT before the next invocation). An outbox still republishing when its
/// invocation gave up on it is stopped, not left to resume after the thaw beside the next
/// invocation's own outbox: every result event goes out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_cut_short_does_not_resume_after_a_freeze() {
    let World { emu, aws, q, .. } = launch_group(3).await;
    let (topic, results) = aws.topic_with_queue("results").await;
    // The hook's test notification and three launches.
    let msgs = receive(&aws, &q, 4).await;
    let p = Provision::new(
        &emu,
        &q,
        Some(&topic),
        &format!(
            "[aws]\nmax_attempts = 1\nretry_for = \"4s\"\nattempt_timeout = \"3s\"\n{WEB_LAYER}"
        ),
    );
    let api = RuntimeApi::start();
    let lambda = start_lambda(&p, &api);

    // 1. The launches complete, but SNS refuses every publish: three events in the outbox.
    emu.fault(
        json!({"service": "sns", "action": "PublishBatch", "count": -1, "error": "throttle"}),
    );
    let id = api.invoke(&sqs_event(&q, &msgs), Duration::from_secs(60));
    let r = response(&api, &lambda, &id, Duration::from_secs(60));
    assert_eq!(r, json!({ "batchItemFailures": [] }), "{}", lambda.log());
    assert_eq!(emu.finished_actions().len(), 3);
    emu.control("DELETE", "/_emulator/faults", None);
    assert!(aws.results(&results).await.is_empty());

    // 2. A short invocation (the test notification only): its outbox's PublishBatch gets no
    // answer, and the invocation ends before the attempt's timeout. Then it is frozen.
    emu.fault(json!({"service": "sns", "action": "PublishBatch", "count": 1, "error": "hang"}));
    let notice: Vec<_> = msgs
        .iter()
        .filter(|m| m.body().unwrap_or_default().contains("TEST_NOTIFICATION"))
        .cloned()
        .collect();
    assert_eq!(notice.len(), 1);
    let id = api.invoke(&sqs_event(&q, &notice), Duration::from_secs(2));
    response(&api, &lambda, &id, Duration::from_secs(30));
    lambda.signal("STOP");
    assert!(emu.faults_left().is_empty(), "the outbox was publishing");
    lambda.signal("CONT");

    // 3. The next invocation's outbox publishes the three events.
    let id = api.invoke(&sqs_event(&q, &notice), Duration::from_secs(60));
    response(&api, &lambda, &id, Duration::from_secs(60));
    let seen = Mutex::new(Vec::new());
    eventually(
        "the three result events",
        Duration::from_secs(30),
        || async {
            let new = aws.results(&results).await;
            let mut seen = seen.lock().unwrap();
            seen.extend(new);
            (seen.len() >= 3).then_some(())
        },
    )
    .await;
    // Long enough for an outbox left over from invocation 2 to publish again: its hung
    // attempt times out (3 s) and is retried at once.
    std::thread::sleep(Duration::from_secs(5));
    let mut events = seen.into_inner().unwrap();
    events.extend(aws.results(&results).await);
    let mut ids: Vec<&str> = events
        .iter()
        .map(|e| e["instance_id"].as_str().unwrap_or_default())
        .collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(
        (n, ids.len()),
        (3, 3),
        "each event once: {events:?}\n{}",
        lambda.log()
    );
}

/// An `ssm` step's batch window opened by a record whose invocation ended (cancelled near
/// its deadline) before the window closed, the environment frozen and thawed, and a record
/// of the next invocation joining that same window: the command goes to the instance
/// whose run still waits, never to the one whose run was cancelled an invocation ago.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_window_resumed_after_a_freeze_sends_nothing_for_a_cancelled_run() {
    let World { emu, aws, q, .. } = launch_group(2).await;
    let msgs = receive(&aws, &q, 3).await;
    let p = Provision::new(
        &emu,
        &q,
        None,
        r#"
[ssm]
batch_window = "8s"

[layers.web]
groups = ["web-*"]
launch = [ { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["touch ran"] } } } ]
"#,
    );
    let api = RuntimeApi::start();
    let lambda = start_lambda(&p, &api);
    let launches: Vec<_> = msgs
        .iter()
        .filter(|m| {
            m.body()
                .unwrap_or_default()
                .contains("EC2_INSTANCE_LAUNCHING")
        })
        .cloned()
        .collect();
    assert_eq!(launches.len(), 2);
    let instance = |m: &aws_sdk_sqs::types::Message| {
        let body: Value = serde_json::from_str(m.body().unwrap()).unwrap();
        body["EC2InstanceId"].as_str().unwrap().to_string()
    };
    let (cancelled, waiting) = (instance(&launches[0]), instance(&launches[1]));

    // 1. A 2 s invocation: the record's step joins the 8 s window and is cancelled at the
    // deadline; the environment is frozen after the response.
    let id = api.invoke(&sqs_event(&q, &launches[..1]), Duration::from_secs(2));
    let r = response(&api, &lambda, &id, Duration::from_secs(30));
    assert_eq!(failures(&r).len(), 1, "{r}\n{}", lambda.log());
    lambda.signal("STOP");
    lambda.signal("CONT");

    // 2. The next invocation's record reaches the same command within the window.
    let id = api.invoke(&sqs_event(&q, &launches[1..]), Duration::from_secs(60));
    let r = response(&api, &lambda, &id, Duration::from_secs(60));
    assert_eq!(r, json!({ "batchItemFailures": [] }), "{}", lambda.log());

    let state = emu.control("GET", "/_emulator/ssm", None);
    let commands = state["commands"].as_array().unwrap();
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(
        commands[0]["instance_ids"],
        json!([waiting]),
        "sent only to the run still waiting\n{}",
        lambda.log()
    );
    let sandbox = state["sandbox"].as_str().unwrap();
    assert!(std::path::Path::new(&format!("{sandbox}/{waiting}/ran")).exists());
    assert!(!std::path::Path::new(&format!("{sandbox}/{cancelled}/ran")).exists());
    let done = emu.finished_actions();
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0]["instance_id"], waiting.as_str());
    assert_eq!(done[0]["result"], "CONTINUE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_unfinished_near_the_deadline_are_cancelled_reported_and_released() {
    let World { emu, aws, q, .. } = launch_group(2).await;
    let msgs = receive(&aws, &q, 3).await;
    // One of the two tag steps hangs far beyond the invocation's deadline.
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": 1, "delay_seconds": 60}));

    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let api = RuntimeApi::start();
    let lambda = start_lambda(&p, &api);
    let limit = Duration::from_secs(15);
    let t0 = Instant::now();
    let id = api.invoke(&sqs_event(&q, &msgs), limit);
    let r = response(&api, &lambda, &id, Duration::from_secs(60));
    let took = t0.elapsed();
    assert!(took < limit, "answered after {took:?}, beyond the deadline");

    let pending = pending_instances(&emu);
    assert_eq!(pending.len(), 1, "{pending:?}\n{}", lambda.log());
    assert_eq!(
        failures(&r),
        [message_for(&msgs, &pending[0])],
        "{}",
        lambda.log()
    );
    let history = p.history();
    let released: Vec<_> = history
        .iter()
        .filter(|r| r.outcome.as_str() == "released")
        .collect();
    assert_eq!(released.len(), 1, "{history:?}");
    assert_eq!(
        released[0].instance_id.as_deref(),
        Some(pending[0].as_str())
    );
    // Released at once (visibility 0), for another invocation to take.
    eventually(
        "the cancelled record to be visible again",
        Duration::from_secs(10),
        || async { (aws.approximate_messages(&q).await.0 == 1).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_dead_letter_queue_a_bad_record_fails_until_the_queue_moves_it() {
    let emu = Emulator::start();
    let aws = Aws::new(&emu).await;
    let dlq = aws.queue("lifecycle-dead").await;
    let url = aws
        .sqs
        .create_queue()
        .queue_name("lifecycle")
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
            json!({"deadLetterTargetArn": dlq.arn, "maxReceiveCount": "2"}).to_string(),
        )
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let q = Queue {
        url,
        arn: format!("arn:aws:sqs:{REGION}:{ACCOUNT}:lifecycle"),
    };
    aws.send(&q, "not json").await;
    aws.send(
        &q,
        r#"{"Event":"autoscaling:TEST_NOTIFICATION","AutoScalingGroupName":"web-prod"}"#,
    )
    .await;
    let msgs = receive(&aws, &q, 2).await;
    let bad = msgs
        .iter()
        .find(|m| m.body() == Some("not json"))
        .and_then(|m| m.message_id())
        .unwrap()
        .to_string();

    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let api = RuntimeApi::start();
    let lambda = start_lambda(&p, &api);
    let id = api.invoke(&sqs_event(&q, &msgs), Duration::from_secs(60));
    let r = response(&api, &lambda, &id, Duration::from_secs(60));
    // The skip succeeds; the reject fails, released at once so it is received again ...
    assert_eq!(failures(&r), [bad.as_str()], "{}", lambda.log());
    let again = receive(&aws, &q, 1).await;
    assert_eq!(again[0].message_id(), Some(bad.as_str()));
    let id = api.invoke(&sqs_event(&q, &again), Duration::from_secs(60));
    let r = response(&api, &lambda, &id, Duration::from_secs(60));
    assert_eq!(failures(&r), [bad.as_str()]);
    // ... until maxReceiveCount receives have passed and SQS moves it to the dead-letter queue.
    let dead = eventually("the reject in the DLQ", Duration::from_secs(10), || async {
        let _ = aws
            .sqs
            .receive_message()
            .queue_url(&q.url)
            .wait_time_seconds(0)
            .send()
            .await;
        let bodies = aws.drain(&dlq).await;
        (!bodies.is_empty()).then_some(bodies)
    })
    .await;
    assert_eq!(dead, ["not json"]);
    let rejected = p
        .history()
        .iter()
        .filter(|r| r.outcome.as_str() == "rejected")
        .count();
    assert_eq!(rejected, 2, "each receive is recorded");
}

#[test]
fn a_config_that_cannot_run_in_lambda_is_refused_at_init() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("plain-file");
    std::fs::write(&not_a_dir, "").unwrap();
    let cases = [
        (
            format!(
                "[queue]\nurl = \"http://127.0.0.1:9/{ACCOUNT}/q\"\n[state]\npath = \"{}\"\n{WEB_LAYER}",
                not_a_dir.join("state.db").display()
            ),
            ["cannot run in AWS Lambda", "state.path", "/tmp"],
        ),
        (
            format!("[queue]\nurl = \"http://127.0.0.1:9/{ACCOUNT}/q\"\nnmae = 1\n{WEB_LAYER}"),
            ["provision.toml", "nmae", "1 problem"],
        ),
        (
            format!(
                "[queue]\nurl = \"http://127.0.0.1:9/{ACCOUNT}/q\"\n[state]\npath = \"/tmp/x.db\"\n\
                 [layers.web]\ngroups = [\"web-*\"]\nlaunch = [ {{ tag = {{ A = \"b\" }} }}, {{ ansible = \"web.yml\" }} ]\n\
                 terminate = [ {{ ssh = [\"true\"] }} ]\n"
            ),
            [
                "cannot run in AWS Lambda",
                "layers.web.launch[1] (ansible)",
                "layers.web.terminate[0] (ssh)",
            ],
        ),
    ];
    for (config, expected) in cases {
        let path = dir.path().join("provision.toml");
        std::fs::write(&path, config).unwrap();
        let api = RuntimeApi::start();
        let log = dir.path().join("lambda.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_provision"));
        cmd.arg("--config")
            .arg(&path)
            .arg("lambda")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_REGION", REGION)
            .env("AWS_EC2_METADATA_DISABLED", "true");
        lambda_env(&mut cmd, &api);
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let code = wait_child(&mut child, Duration::from_secs(30));
        let stderr = std::fs::read_to_string(&log).unwrap();
        assert_ne!(code, 0, "{stderr}");
        let errors = api.init_errors();
        assert_eq!(errors.len(), 1, "{errors:?}\n{stderr}");
        let (kind, body) = &errors[0];
        assert_eq!(kind, "Runtime.InitError");
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["errorType"], "Runtime.InitError");
        let message = body["errorMessage"].as_str().unwrap();
        for e in expected {
            assert!(message.contains(e), "{e:?} not in {message:?}");
            assert!(stderr.contains(e), "{e:?} not in stderr:\n{stderr}");
        }
    }
}

/// The deployment package (`scripts/lambda-zip`, around the debug binary): its `bootstrap`,
/// unpacked into an empty directory and started without arguments as Lambda starts it,
/// reads the provision.toml beside it, serves the Runtime API and completes a launch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zipped_bootstrap_runs_from_an_empty_directory() {
    let World { emu, aws, q, .. } = launch_group(1).await;
    let msgs = receive(&aws, &q, 2).await;
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/lambda-zip"))
        .arg(&p.config)
        .arg("--debug")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let zip = root.join(String::from_utf8_lossy(&out.stdout).trim());
    let task = tempfile::tempdir().unwrap();
    let unzip = Command::new("python3")
        .args(["-c", "import sys, zipfile, os\nz = zipfile.ZipFile(sys.argv[1])\nfor i in z.infolist():\n    z.extract(i, sys.argv[2])\n    os.chmod(os.path.join(sys.argv[2], i.filename), i.external_attr >> 16 & 0o777)"])
        .arg(&zip)
        .arg(task.path())
        .status()
        .unwrap();
    assert!(unzip.success());
    let mut names: Vec<String> = std::fs::read_dir(task.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["bootstrap", "provision.toml"]);

    let api = RuntimeApi::start();
    let mut cmd = p.command(&[]);
    // As Lambda starts it: /var/task/bootstrap, no arguments, no PROVISION_CONFIG.
    let mut bare = Command::new(task.path().join("bootstrap"));
    bare.current_dir(task.path()).env_clear();
    for (k, v) in cmd.get_envs() {
        if let (Some(v), false) = (v, k == "PROVISION_CONFIG") {
            bare.env(k, v);
        }
    }
    cmd = bare;
    lambda_env(&mut cmd, &api);
    let log = p.dir.join("bootstrap.log");
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let lambda = Running { child, log };
    let id = api.invoke(&sqs_event(&q, &msgs), Duration::from_secs(120));
    let r = response(&api, &lambda, &id, Duration::from_secs(60));
    assert_eq!(r, json!({ "batchItemFailures": [] }), "{}", lambda.log());
    let instances = aws.instances("web-prod").await;
    assert_eq!(instances[0].1, "InService", "{}", lambda.log());
    // JSON logs, as the bootstrap asks for.
    assert!(
        lambda.log().lines().any(|l| l.starts_with('{')),
        "{}",
        lambda.log()
    );
}

//! Test harness: a private emulator per test, AWS resources in it, and the real `provision`
//! binary run against it. Everything listens on 127.0.0.1; every process started here is
//! killed when its guard drops.

pub mod hosts;
pub mod sim;
mod world;

pub use world::{World, LAUNCH, TERMINATE};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::config::Credentials;
use serde_json::Value;

pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PROVISION_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run ./scripts/test (it installs the emulator into .venv)",
        p.display()
    );
    p
}

/// Polls `f` every 100 ms until it returns Some, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The moto-based emulator (tests/emulator/emulator.py) on its own port.
pub struct Emulator {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Emulator {
    /// The emulator's process id (its CPU, for the benchmark).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the emulator on a port the kernel picks (`-p 0`): the child writes the port to a
    /// file once it listens, and the health check must answer with the child's own pid, so a
    /// port taken by another process can never be mistaken for this test's emulator.
    pub fn start() -> Emulator {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("emulator.log");
        let port_file = dir.path().join("port");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(python())
            .arg(root().join("tests/emulator/emulator.py"))
            .args(["-H", "127.0.0.1", "-p", "0", "--port-file"])
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the emulator");
        let mut emu = Emulator {
            port: 0,
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let failed = |why: &str| -> ! {
            let kept =
                std::env::temp_dir().join(format!("provision-emulator-{}.log", fastrand::u32(..)));
            let _ = std::fs::copy(&log_path, &kept);
            panic!("emulator {why}; its log is copied to {}", kept.display());
        };
        loop {
            if let Ok(Some(status)) = emu.child.try_wait() {
                failed(&format!("exited at start ({status})"));
            }
            if Instant::now() > deadline {
                failed("did not start within 60 s");
            }
            if emu.port == 0 {
                emu.port = std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or(0);
            }
            if emu.port != 0 {
                if let Ok((200, body)) = emu.try_request("GET", "/_emulator/health", None) {
                    let pid =
                        serde_json::from_str::<Value>(&body).unwrap_or(Value::Null)["pid"].as_u64();
                    if pid != Some(u64::from(emu.child.id())) {
                        failed(&format!(
                            "port {} answered from another process (pid {pid:?})",
                            emu.port
                        ));
                    }
                    return emu;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Moves Auto Scaling's clock `seconds` on: hook heartbeat and global timeouts, and the
    /// times in lifecycle messages, are read from it. The timeouts that passed are applied
    /// before this returns.
    pub fn advance_clock(&self, seconds: u64) {
        self.control(
            "POST",
            "/_emulator/clock",
            Some(serde_json::json!({ "advance_seconds": seconds })),
        );
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment that points the AWS SDK (ours and the binary's) at this emulator only.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", REGION.into()),
            ("AWS_CONFIG_FILE", "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    pub async fn sdk(&self) -> aws_config::SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(self.endpoint())
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .load()
            .await
    }

    fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad status line"))?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    pub fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, text) = self
            .try_request(method, path, body.as_ref())
            .expect("emulator control call");
        assert!(status < 300, "{method} {path}: HTTP {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// While one action is pending: after each of its next `beats` heartbeats, moves Auto
    /// Scaling's clock `seconds` on. The action ages by `beats * seconds` more than the real
    /// time that passes, so a run that stopped heartbeating times out (as AWS would) long
    /// before the test could have slept through the hook's timeout.
    pub async fn age_between_heartbeats(&self, beats: u64, seconds: u64) {
        let pending = || self.actions().into_iter().find(|a| a["state"] == "pending");
        let first = eventually("a pending action", Duration::from_secs(60), || async {
            pending()
        })
        .await;
        let token = first["token"].clone();
        let mut seen = first["heartbeats"].as_u64().unwrap_or(0);
        for _ in 0..beats {
            seen = eventually("the next heartbeat", Duration::from_secs(60), || async {
                let a = self.actions().into_iter().find(|a| a["token"] == token)?;
                assert_eq!(
                    a["state"], "pending",
                    "the action ended before its next heartbeat: {a}"
                );
                let n = a["heartbeats"].as_u64().unwrap_or(0);
                (n > seen).then_some(n)
            })
            .await;
            self.advance_clock(seconds);
        }
    }

    /// Every lifecycle action the emulator knows, pending and finished.
    pub fn actions(&self) -> Vec<Value> {
        self.control("GET", "/_emulator/lifecycle", None)["actions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn finished_actions(&self) -> Vec<Value> {
        self.actions()
            .into_iter()
            .filter(|a| a["state"] == "finished")
            .collect()
    }

    /// API calls the provision binary made (its SDK announces itself as app/provision), by
    /// "service:Action".
    pub fn provision_calls(&self) -> serde_json::Map<String, Value> {
        self.control("GET", "/_emulator/calls", None)["by_app"]["provision"]
            .as_object()
            .cloned()
            .unwrap_or_default()
    }

    /// API calls by "service:Action".
    pub fn calls(&self) -> serde_json::Map<String, Value> {
        self.control("GET", "/_emulator/calls", None)["calls"]
            .as_object()
            .cloned()
            .unwrap_or_default()
    }

    /// A call in an AWS JSON protocol (for services the project has no SDK crate for, such
    /// as EventBridge). The emulator does not check signatures; the credential scope names
    /// the service.
    pub fn aws_json(&self, service: &str, target: &str, body: Value) -> Value {
        let body = body.to_string();
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-amz-json-1.1\r\nX-Amz-Target: {target}\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/{service}/aws4_request, SignedHeaders=host, Signature=0\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"),
            "{target}: {resp}"
        );
        let text = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(text).unwrap_or(Value::Null)
    }

    /// An IAM role `name` in `account` trusting `trust` (an AssumeRolePolicyDocument): made
    /// through IAM's CreateRole with moto's `x-moto-account-id` header (the test stands in
    /// for the member account's administrator). Answers the role's ARN.
    pub fn create_role_in(&self, account: &str, name: &str, trust: &Value) -> String {
        let enc = |v: &str| -> String {
            v.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        let body = format!(
            "Action=CreateRole&Version=2010-05-08&RoleName={}&AssumeRolePolicyDocument={}",
            enc(name),
            enc(&trust.to_string())
        );
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             x-moto-account-id: {account}\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/iam/aws4_request, SignedHeaders=host, Signature=0\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "CreateRole: {resp}");
        format!("arn:aws:iam::{account}:role/{name}")
    }

    pub fn fault(&self, spec: Value) {
        self.control("POST", "/_emulator/faults", Some(spec));
    }

    /// The injected faults not yet answered (a fault leaves the list when its count is spent).
    pub fn faults_left(&self) -> Vec<Value> {
        self.control("GET", "/_emulator/faults", None)["faults"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.record_provision_calls();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Emulator {
    /// Saves the AWS operations the provision binary made against this emulator (its SDK
    /// announces itself as app/provision) to target/aws-calls/, where scripts/check_iam.py
    /// checks every one of them against config/iam-policy.json after the test run.
    fn record_provision_calls(&self) {
        let Ok((200, body)) = self.try_request("GET", "/_emulator/calls", None) else {
            return;
        };
        let Ok(v) = serde_json::from_str::<Value>(&body) else {
            return;
        };
        let calls = &v["by_app"]["provision"];
        if calls.as_object().is_none_or(|m| m.is_empty()) {
            return;
        }
        let dir = root().join("target/aws-calls");
        let _ = std::fs::create_dir_all(&dir);
        let name = format!("{}-{}.json", std::process::id(), self.port);
        let _ = std::fs::write(dir.join(name), calls.to_string());
    }
}

/// AWS resources for one test: a queue, a group with hooks, optionally a result topic.
pub struct Aws {
    pub sqs: aws_sdk_sqs::Client,
    pub sns: aws_sdk_sns::Client,
    pub asg: aws_sdk_autoscaling::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub sdk: aws_config::SdkConfig,
    /// The account and region its clients act in (ACCOUNT and REGION unless assumed).
    pub account: String,
    pub region: String,
}

pub struct Queue {
    pub url: String,
    pub arn: String,
}

impl Aws {
    pub async fn new(emu: &Emulator) -> Aws {
        Aws::with(emu.sdk().await, ACCOUNT)
    }

    /// The default account's clients in another region.
    pub async fn with_region(emu: &Emulator, region: &str) -> Aws {
        let sdk = emu
            .sdk()
            .await
            .to_builder()
            .region(Region::new(region.to_string()))
            .build();
        Aws::with(sdk, ACCOUNT)
    }

    fn with(sdk: aws_config::SdkConfig, account: &str) -> Aws {
        Aws {
            sqs: aws_sdk_sqs::Client::new(&sdk),
            sns: aws_sdk_sns::Client::new(&sdk),
            asg: aws_sdk_autoscaling::Client::new(&sdk),
            ec2: aws_sdk_ec2::Client::new(&sdk),
            region: sdk.region().map(ToString::to_string).unwrap_or_default(),
            account: account.to_string(),
            sdk,
        }
    }

    /// Clients in `role_arn`'s account and `region`, with the credentials AssumeRole
    /// (through the emulator's STS, with `external_id`) gives.
    pub async fn assumed(emu: &Emulator, role_arn: &str, external_id: &str, region: &str) -> Aws {
        let base = emu.sdk().await;
        let provider = aws_config::sts::AssumeRoleProvider::builder(role_arn)
            .session_name("provision-tests")
            .external_id(external_id)
            .region(Region::new(region.to_string()))
            .configure(&base)
            .build()
            .await;
        let sdk = base
            .to_builder()
            .region(Region::new(region.to_string()))
            .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
                provider,
            ))
            .build();
        let account = role_arn.split(':').nth(4).expect("a role ARN").to_string();
        Aws::with(sdk, &account)
    }

    pub async fn queue(&self, name: &str) -> Queue {
        let url = self
            .sqs
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        Queue {
            arn: format!("arn:aws:sqs:{}:{}:{name}", self.region, self.account),
            url,
        }
    }

    /// A queue whose redrive policy moves a message to `<name>-dlq` after `max_receives`
    /// receives: (the queue, its dead-letter queue).
    /// The launch notifications of `n` instances, read off a hook's own queue (bounded).
    pub async fn launch_notifications(&self, source: &Queue, n: usize) -> Vec<String> {
        let mut bodies = Vec::new();
        for _ in 0..120 {
            let new = self.drain(source).await;
            bodies.extend(
                new.into_iter()
                    .filter(|b| b.contains("EC2_INSTANCE_LAUNCHING")),
            );
            if bodies.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(bodies.len(), n);
        bodies
    }

    pub async fn queue_with_dlq(&self, name: &str, max_receives: u32) -> (Queue, Queue) {
        let dlq = self.queue(&format!("{name}-dlq")).await;
        let policy = format!(
            r#"{{"deadLetterTargetArn":"{}","maxReceiveCount":"{max_receives}"}}"#,
            dlq.arn
        );
        let url = self
            .sqs
            .create_queue()
            .queue_name(name)
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
                policy,
            )
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let q = Queue {
            arn: format!("arn:aws:sqs:{}:{}:{name}", self.region, self.account),
            url,
        };
        (q, dlq)
    }

    /// A topic and a queue subscribed to it (envelope delivery, as AWS does by default).
    pub async fn topic_with_queue(&self, name: &str) -> (String, Queue) {
        let q = self.queue(&format!("{name}-sub")).await;
        (self.topic_into(name, &q).await, q)
    }

    /// A topic delivering into `q` (envelope delivery, as AWS does by default).
    pub async fn topic_into(&self, name: &str, q: &Queue) -> String {
        let arn = self
            .sns
            .create_topic()
            .name(name)
            .send()
            .await
            .unwrap()
            .topic_arn
            .unwrap();
        self.sns
            .subscribe()
            .topic_arn(&arn)
            .protocol("sqs")
            .endpoint(&q.arn)
            .send()
            .await
            .unwrap();
        arn
    }

    /// Bodies of all messages in a queue, deleting them (bounded number of receives).
    pub async fn drain(&self, q: &Queue) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..50 {
            let r = self
                .sqs
                .receive_message()
                .queue_url(&q.url)
                .max_number_of_messages(10)
                .wait_time_seconds(0)
                .send()
                .await
                .unwrap();
            let msgs = r.messages.unwrap_or_default();
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                self.sqs
                    .delete_message()
                    .queue_url(&q.url)
                    .receipt_handle(m.receipt_handle.unwrap())
                    .send()
                    .await
                    .unwrap();
                out.push(m.body.unwrap_or_default());
            }
        }
        out
    }

    /// Result events published to a topic, read from its subscribed queue.
    pub async fn results(&self, q: &Queue) -> Vec<Value> {
        self.drain(q)
            .await
            .iter()
            .map(|b| {
                let env: Value = serde_json::from_str(b).unwrap();
                serde_json::from_str(env["Message"].as_str().unwrap()).unwrap()
            })
            .collect()
    }

    pub async fn approximate_messages(&self, q: &Queue) -> (i64, i64) {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let r = self
            .sqs
            .get_queue_attributes()
            .queue_url(&q.url)
            .attribute_names(A::ApproximateNumberOfMessages)
            .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .unwrap();
        let a = r.attributes.unwrap_or_default();
        let n = |k| {
            a.get(&k)
                .and_then(|v: &String| v.parse().ok())
                .unwrap_or(-1)
        };
        (
            n(A::ApproximateNumberOfMessages),
            n(A::ApproximateNumberOfMessagesNotVisible),
        )
    }

    /// A group of `desired` 0 in a fresh VPC, ready for hooks.
    pub async fn group(&self, name: &str) {
        self.group_in(name, "10.200.0.0/16", "10.200.0.0/24").await
    }

    /// A group whose instances get private IPs in `subnet_cidr` (e.g. a `HostNet`'s /24, so
    /// simulated hosts can take the instances' addresses).
    pub async fn group_in(&self, name: &str, vpc_cidr: &str, subnet_cidr: &str) {
        let vpc = self
            .ec2
            .create_vpc()
            .cidr_block(vpc_cidr)
            .send()
            .await
            .unwrap();
        let vpc_id = vpc.vpc.unwrap().vpc_id.unwrap();
        let subnet = self
            .ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(subnet_cidr)
            .availability_zone(format!("{}a", self.region))
            .send()
            .await
            .unwrap();
        let subnet_id = subnet.subnet.unwrap().subnet_id.unwrap();
        let image = self
            .ec2
            .describe_images()
            .owners("amazon")
            .send()
            .await
            .unwrap()
            .images
            .unwrap_or_default()
            .into_iter()
            .find_map(|i| i.image_id)
            .expect("the emulator has an image");
        use aws_sdk_ec2::types::RequestLaunchTemplateData;
        self.ec2
            .create_launch_template()
            .launch_template_name(format!("{name}-lt"))
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(image)
                    .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        use aws_sdk_autoscaling::types::LaunchTemplateSpecification;
        self.asg
            .create_auto_scaling_group()
            .auto_scaling_group_name(name)
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_name(format!("{name}-lt"))
                    .build(),
            )
            .min_size(0)
            .max_size(600)
            .desired_capacity(0)
            .vpc_zone_identifier(subnet_id)
            .send()
            .await
            .unwrap();
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn hook(
        &self,
        group: &str,
        hook: &str,
        transition: &str,
        target_arn: Option<&str>,
        heartbeat: i32,
        default_result: &str,
        metadata: Option<&str>,
    ) {
        let mut req = self
            .asg
            .put_lifecycle_hook()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .lifecycle_transition(transition)
            .heartbeat_timeout(heartbeat)
            .default_result(default_result);
        if let Some(arn) = target_arn {
            req = req
                .notification_target_arn(arn)
                .role_arn(format!("arn:aws:iam::{}:role/asg-notify", self.account));
        }
        if let Some(m) = metadata {
            req = req.notification_metadata(m);
        }
        req.send().await.unwrap();
    }

    pub async fn scale(&self, group: &str, desired: i32) {
        self.asg
            .set_desired_capacity()
            .auto_scaling_group_name(group)
            .desired_capacity(desired)
            .send()
            .await
            .unwrap();
    }

    /// (instance id, lifecycle state) of every instance in the group.
    pub async fn instances(&self, group: &str) -> Vec<(String, String)> {
        let r = self
            .asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .unwrap();
        r.auto_scaling_groups()
            .first()
            .map(|g| {
                g.instances()
                    .iter()
                    .map(|i| id_and_state(i.instance_id(), i.lifecycle_state()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn tags(&self, instance: &str) -> std::collections::BTreeMap<String, String> {
        self.describe_instance(instance)
            .await
            .tags()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_string(),
                    t.value().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// CreateTags on one instance (as someone allowed to tag it would).
    pub async fn tag(&self, instance: &str, tags: &[(&str, &str)]) {
        use aws_sdk_ec2::types::Tag;
        self.ec2
            .create_tags()
            .resources(instance)
            .set_tags(Some(
                tags.iter()
                    .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                    .collect(),
            ))
            .send()
            .await
            .unwrap();
    }

    async fn describe_instance(&self, instance: &str) -> aws_sdk_ec2::types::Instance {
        let r = self
            .ec2
            .describe_instances()
            .instance_ids(instance)
            .send()
            .await
            .unwrap();
        r.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .next()
            .cloned()
            .unwrap_or_else(|| panic!("no instance {instance}"))
    }

    pub async fn private_ip(&self, instance: &str) -> String {
        self.describe_instance(instance)
            .await
            .private_ip_address()
            .expect("the instance has a private IP")
            .to_string()
    }

    pub async fn instance_state(&self, instance: &str) -> String {
        self.describe_instance(instance)
            .await
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default()
    }

    pub async fn send(&self, q: &Queue, body: &str) {
        self.sqs
            .send_message()
            .queue_url(&q.url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }
}

/// An Auto Scaling instance (group member or warm pool entry) as (id, lifecycle state).
pub fn id_and_state(
    id: Option<&str>,
    state: Option<&aws_sdk_autoscaling::types::LifecycleState>,
) -> (String, String) {
    (
        id.unwrap_or_default().to_string(),
        state.map(|s| s.as_str().to_string()).unwrap_or_default(),
    )
}

/// The claims table as config/cloudformation.yaml makes it.
pub async fn claims_table(aws: &Aws, table: &str) -> aws_sdk_dynamodb::Client {
    let db = aws_sdk_dynamodb::Client::new(&aws.sdk);
    db.create_table()
        .table_name(table)
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .attribute_definitions(
            aws_sdk_dynamodb::types::AttributeDefinition::builder()
                .attribute_name("token")
                .attribute_type(aws_sdk_dynamodb::types::ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            aws_sdk_dynamodb::types::KeySchemaElement::builder()
                .attribute_name("token")
                .key_type(aws_sdk_dynamodb::types::KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    db.update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            aws_sdk_dynamodb::types::TimeToLiveSpecification::builder()
                .attribute_name("expires_at")
                .enabled(true)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    db
}

/// The fleet's history table as config/cloudformation.yaml makes it: `instance_id` and
/// `run` keys, TTL on `expires_at`.
pub async fn history_table(aws: &Aws, table: &str) {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    let db = aws_sdk_dynamodb::Client::new(&aws.sdk);
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .unwrap()
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .unwrap()
    };
    db.create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("instance_id"))
        .attribute_definitions(attr("run"))
        .key_schema(key("instance_id", KeyType::Hash))
        .key_schema(key("run", KeyType::Range))
        .send()
        .await
        .unwrap();
}

/// Polls an async condition every 200 ms until it returns Some, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `provision` binary with a config of the test's making.
pub struct Provision {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl Provision {
    /// `extra` is TOML for the [layers.*] tables (and any other tables), merged into a
    /// config whose queue, state and notify settings are filled in. The metrics endpoint is
    /// off unless a test asks for it (`serve_metrics`): no two daemons share a port.
    pub fn new(emu: &Emulator, queue: &Queue, topic: Option<&str>, extra: &str) -> Provision {
        let dir = emu
            .dir
            .path()
            .join(format!("provision-{}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state.db");
        let mut table = toml::Table::new();
        set_key(&mut table, "queue.url", queue.url.as_str());
        set_key(&mut table, "queue.wait_time", "1s");
        set_key(&mut table, "queue.visibility_timeout", "30s");
        if let Some(t) = topic {
            set_key(&mut table, "notify.topic_arn", t);
        }
        set_key(&mut table, "state.path", path_str(&state));
        set_key(&mut table, "metrics.listen", "off");
        // Reconcile is the tests' to turn on (`reconcile` suite): off, no pass competes with
        // the messages a test sends, and no launch writes the configured mark.
        set_key(&mut table, "reconcile.interval", "off");
        set_key(&mut table, "reconcile.unconfigured", "off");
        let extra: toml::Table = extra
            .parse()
            .unwrap_or_else(|e| panic!("the test's TOML: {e}\n{extra}"));
        merge(&mut table, extra);
        let p = Provision {
            config: dir.join("provision.toml"),
            dir,
            state,
            env: emu.env(),
        };
        p.write_config(&table);
        p
    }

    /// An environment variable for every command this runs.
    pub fn set_env(&mut self, key: &'static str, value: impl Into<String>) {
        self.env.push((key, value.into()));
    }

    /// The config as written.
    pub fn config(&self) -> toml::Table {
        std::fs::read_to_string(&self.config)
            .unwrap()
            .parse()
            .unwrap()
    }

    fn write_config(&self, table: &toml::Table) {
        std::fs::write(&self.config, toml::to_string(table).unwrap()).unwrap();
    }

    /// Sets one key of the config, by its dotted path (`"queue.visibility_timeout"`).
    pub fn set(&self, key: &str, value: impl Into<toml::Value>) {
        let mut table = self.config();
        set_key(&mut table, key, value);
        self.write_config(&table);
    }

    /// Removes a key from the config, by its dotted path (`"sources"`, `"queue.url"`).
    pub fn remove(&self, key: &str) {
        let mut t = self.config();
        let mut table = &mut t;
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().expect("a key");
        for p in parts {
            table = table
                .get_mut(p)
                .and_then(toml::Value::as_table_mut)
                .unwrap_or_else(|| panic!("no table {p} in the config"));
        }
        table.remove(last);
        self.write_config(&t);
    }

    /// Merges TOML text into the config, table by table; its keys win.
    pub fn merge(&self, text: &str) {
        let mut table = self.config();
        let more: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("the test's TOML: {e}\n{text}"));
        merge(&mut table, more);
        self.write_config(&table);
    }

    /// Claims in the DynamoDB `table` (as ops hosts of a fleet), leases of `lease`.
    pub fn share_claims(&self, table: &str, lease: &str) {
        self.set("state.claims_table", table);
        self.set("state.claim_lease", lease);
    }

    /// The daemon serves /metrics and /healthz on a port the kernel picks; `metrics_port`
    /// reads it from the daemon's log.
    pub fn serve_metrics(&self) {
        self.set("metrics.listen", "127.0.0.1:0");
    }

    /// `provision ARGS` with this config. The binary is env PROVISION_BIN when set (the
    /// ansible benchmark runs the release build, as production does), else the one cargo
    /// built for these tests.
    pub fn command(&self, args: &[&str]) -> Command {
        let bin = std::env::var_os("PROVISION_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_provision")));
        let mut c = Command::new(bin);
        c.arg("--config").arg(&self.config).args(args);
        c.env_clear();
        c.env("PATH", std::env::var("PATH").unwrap_or_default());
        c.env("RUST_LOG", "provision=debug,warn");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs `provision worker` to completion (bounded), returning (exit code, stderr).
    pub fn worker(&self) -> (i32, String) {
        let log = self.dir.join(format!("worker-{}.log", fastrand::u32(..)));
        let mut child = self
            .command(&["worker"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let status = wait_child(&mut child, Duration::from_secs(120));
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// Starts `provision daemon` in the background; killed when the guard drops.
    pub fn daemon(&self) -> Running {
        let log = self.dir.join(format!("daemon-{}.log", fastrand::u32(..)));
        let child = self
            .command(&["daemon"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Running { child, log }
    }

    /// Runs `provision ARGS` to completion (bounded: 3 minutes).
    pub fn output(&self, args: &[&str]) -> std::process::Output {
        output_within(&mut self.command(args), Duration::from_secs(180))
    }

    /// The latest run for `instance` with `transition` ("launch", "terminate").
    pub fn last_run(&self, instance: &str, transition: &str) -> provision::store::RunRow {
        self.history()
            .into_iter()
            .find(|r| {
                r.instance_id.as_deref() == Some(instance)
                    && r.transition.as_deref() == Some(transition)
            })
            .unwrap_or_else(|| panic!("no {transition} run for {instance}"))
    }

    pub fn history(&self) -> Vec<provision::store::RunRow> {
        provision::store::Store::open(&self.state)
            .unwrap()
            .history(None, 10_000)
            .unwrap()
    }
}

/// Waits for a child up to `timeout` (then stops it and fails the test).
pub fn wait_child(child: &mut Child, timeout: Duration) -> i32 {
    wait_status(child, timeout).code().unwrap_or(-1)
}

fn wait_status(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            stop_child(child);
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, up to 5 s to exit (provision then stops its own children: ansible-playbook's
/// process group, ssh masters), then SIGKILL.
pub fn stop_child(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `cmd.output()`, bounded: past `timeout` the process is stopped and the test fails. The
/// output goes through files, not pipes: a grandchild that outlives the child (an ssh
/// ControlPersist master) cannot keep the read open.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let status = wait_status(&mut child, timeout);
    std::process::Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

pub struct Running {
    pub child: Child,
    pub log: PathBuf,
}

impl Running {
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn wait(&mut self, timeout: Duration) -> i32 {
        wait_child(&mut self.child, timeout)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The port the daemon serves /metrics on (after `Provision::serve_metrics`), from its
    /// log line `serving /metrics and /healthz addr=127.0.0.1:PORT` (the port it bound).
    pub fn metrics_port(&self) -> u16 {
        wait_for("the metrics endpoint", Duration::from_secs(30), || {
            let log = self.log();
            let line = log
                .lines()
                .find(|l| l.contains("serving /metrics and /healthz"))?;
            // (The log may be coloured: read the digits after the address.)
            let after = line.split("127.0.0.1:").nth(1)?;
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The table at a dotted path, made if missing.
fn section<'a>(table: &'a mut toml::Table, path: &str) -> &'a mut toml::Table {
    path.split('.').fold(table, |t, k| {
        t.entry(k)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap_or_else(|| panic!("{k} is not a table"))
    })
}

fn set_key(table: &mut toml::Table, key: &str, value: impl Into<toml::Value>) {
    let (parent, last) = key.rsplit_once('.').expect("a dotted key");
    section(table, parent).insert(last.to_string(), value.into());
}

/// `from` merged into `into`, table by table (a test's tables extend the generated ones).
fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// A lifecycle message whose `Time` is `by` earlier (other bodies unchanged).
pub fn backdated(body: &str, by: Duration) -> String {
    let mut v: Value = serde_json::from_str(body).unwrap();
    if let Some(t) = v["Time"].as_str() {
        let t = humantime::parse_rfc3339(t).unwrap() - by;
        v["Time"] = humantime::format_rfc3339_millis(t).to_string().into();
    }
    v.to_string()
}

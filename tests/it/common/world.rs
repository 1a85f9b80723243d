//! One test's world, built in one expression: its own emulator, the queue provision reads,
//! a group with its lifecycle hooks, optionally a dead-letter queue, a queue the test relays
//! messages from, a claims table, and the layer the test's `provision` runs.
//!
//! ```ignore
//! let w = World::builder("web-t").metadata(METADATA).layer(WEB_LAYER).instances(3).start().await;
//! let (code, log) = w.provision().worker();
//! ```

use std::time::Duration;

use serde_json::Value;

use super::{claims_table, eventually, Aws, Emulator, Provision, Queue};

pub const LAUNCH: &str = "autoscaling:EC2_INSTANCE_LAUNCHING";
pub const TERMINATE: &str = "autoscaling:EC2_INSTANCE_TERMINATING";

/// The claims table a fleet's hosts share, as config/cloudformation.yaml names it.
const CLAIMS_TABLE: &str = "provision-claims";

pub struct World {
    pub emu: Emulator,
    pub aws: Aws,
    /// The queue provision reads ("lifecycle").
    pub q: Queue,
    /// Where the launch hook notifies when the test relays (or tampers with) its messages
    /// ("hook-target"; see `WorldBuilder::relayed`).
    pub source: Option<Queue>,
    /// The dead-letter queue of `q` (see `WorldBuilder::dead_letter_after`).
    pub dlq: Option<Queue>,
    pub group: String,
    /// TOML for `provision`'s layers (and any other tables).
    pub layer: String,
    /// The claims table, when the world has one: `provision()` shares claims in it.
    pub claims: Option<aws_sdk_dynamodb::Client>,
    lease: String,
}

pub struct WorldBuilder {
    group: String,
    heartbeat: i32,
    metadata: Option<String>,
    terminate_hook: Option<&'static str>,
    relayed: bool,
    max_receives: Option<u32>,
    subnet: Option<(String, String)>,
    instances: i32,
    layer: String,
    claims: Option<String>,
}

impl World {
    /// A world around the group `group`: its launch hook "provision-launch" (heartbeat
    /// timeout 300 s unless told, DefaultResult ABANDON) notifies the queue provision reads.
    pub fn builder(group: &str) -> WorldBuilder {
        WorldBuilder {
            group: group.to_string(),
            heartbeat: 300,
            metadata: None,
            terminate_hook: None,
            relayed: false,
            max_receives: None,
            subnet: None,
            instances: 0,
            layer: String::new(),
            claims: None,
        }
    }

    /// `provision` with the world's layer (and its claims table, if any).
    pub fn provision(&self) -> Provision {
        self.provision_with(None, &self.layer)
    }

    /// `provision` with a result topic and TOML of the test's own.
    pub fn provision_with(&self, topic: Option<&str>, toml: &str) -> Provision {
        let p = Provision::new(&self.emu, &self.q, topic, toml);
        if self.claims.is_some() {
            p.share_claims(CLAIMS_TABLE, &self.lease);
        }
        p
    }

    /// Calls of `op` ("service:Action") the emulator answered, from anyone.
    pub fn calls(&self, op: &str) -> u64 {
        self.emu
            .calls()
            .get(op)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    pub async fn wait_calls(&self, op: &str, n: u64) {
        eventually(
            &format!("{n} calls of {op}"),
            Duration::from_secs(60),
            || async { (self.calls(op) >= n).then_some(()) },
        )
        .await;
    }

    pub async fn wait_finished(&self, n: usize) {
        self.wait_finished_within(n, Duration::from_secs(120)).await;
    }

    /// Waits for `n` actions to finish, no longer than the behaviour under test allows.
    pub async fn wait_finished_within(&self, n: usize, timeout: Duration) {
        eventually(&format!("{n} actions to finish"), timeout, || async {
            (self.emu.finished_actions().len() >= n).then_some(())
        })
        .await;
    }

    /// The queue provision reads has nothing left, visible or in flight.
    pub async fn queue_is_empty(&self) {
        eventually("the queue to be empty", Duration::from_secs(30), || async {
            (self.aws.approximate_messages(&self.q).await == (0, 0)).then_some(())
        })
        .await;
    }
}

impl WorldBuilder {
    /// The hooks' heartbeat timeout in seconds (default 300).
    pub fn heartbeat(mut self, seconds: i32) -> Self {
        self.heartbeat = seconds;
        self
    }

    /// The hooks' NotificationMetadata.
    pub fn metadata(mut self, json: &str) -> Self {
        self.metadata = Some(json.to_string());
        self
    }

    /// A terminate hook "provision-terminate" notifying the same queue, with `default_result`.
    pub fn terminate_hook(mut self, default_result: &'static str) -> Self {
        self.terminate_hook = Some(default_result);
        self
    }

    /// The hooks notify a queue of their own ("hook-target", `World::source`) that the test
    /// relays to provision's queue.
    pub fn relayed(mut self) -> Self {
        self.relayed = true;
        self
    }

    /// Provision's queue moves a message to its dead-letter queue ("lifecycle-dlq",
    /// `World::dlq`) after `receives` receives.
    pub fn dead_letter_after(mut self, receives: u32) -> Self {
        self.max_receives = Some(receives);
        self
    }

    /// The group's instances get private IPs in `cidr` (a `HostNet`'s /24, so simulated
    /// hosts can take the instances' addresses).
    pub fn subnet(mut self, vpc_cidr: &str, cidr: &str) -> Self {
        self.subnet = Some((vpc_cidr.to_string(), cidr.to_string()));
        self
    }

    /// The group scaled out to `n` once its hooks exist.
    pub fn instances(mut self, n: i32) -> Self {
        self.instances = n;
        self
    }

    /// TOML for `World::provision`'s layers (and any other tables).
    pub fn layer(mut self, toml: &str) -> Self {
        self.layer = toml.to_string();
        self
    }

    /// A claims table (`CLAIMS_TABLE`) that `World::provision` shares, with leases of `lease`.
    pub fn claims(mut self, lease: &str) -> Self {
        self.claims = Some(lease.to_string());
        self
    }

    pub async fn start(self) -> World {
        let emu = Emulator::start();
        let aws = Aws::new(&emu).await;
        let (q, dlq) = match self.max_receives {
            Some(n) => {
                let (q, dlq) = aws.queue_with_dlq("lifecycle", n).await;
                (q, Some(dlq))
            }
            None => (aws.queue("lifecycle").await, None),
        };
        let source = match self.relayed {
            true => Some(aws.queue("hook-target").await),
            false => None,
        };
        let target = source.as_ref().unwrap_or(&q).arn.clone();
        match &self.subnet {
            Some((vpc, cidr)) => aws.group_in(&self.group, vpc, cidr).await,
            None => aws.group(&self.group).await,
        }
        let metadata = self.metadata.as_deref();
        let (hook, default) = ("provision-launch", "ABANDON");
        aws.hook(
            &self.group,
            hook,
            LAUNCH,
            Some(&target),
            self.heartbeat,
            default,
            metadata,
        )
        .await;
        if let Some(default) = self.terminate_hook {
            let hook = "provision-terminate";
            aws.hook(
                &self.group,
                hook,
                TERMINATE,
                Some(&target),
                self.heartbeat,
                default,
                metadata,
            )
            .await;
        }
        if self.instances > 0 {
            aws.scale(&self.group, self.instances).await;
        }
        let claims = match &self.claims {
            Some(_) => Some(claims_table(&aws, CLAIMS_TABLE).await),
            None => None,
        };
        World {
            emu,
            aws,
            q,
            source,
            dlq,
            group: self.group,
            layer: self.layer,
            claims,
            lease: self.claims.unwrap_or_default(),
        }
    }
}

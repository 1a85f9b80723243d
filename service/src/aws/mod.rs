//! The AWS boundary: narrow traits that speak this project's types, and their SDK impls.
//!
//! The pipeline never sees an SDK type. Each trait is the handful of calls one concern needs
//! (the queue, the hooks, the instances, the result topic), so unit tests can hand in small
//! fakes and the integration tests drive the real SDK (`sdk.rs`) against the emulator.
//! Classifying errors (retryable or not) happens here, once; retrying beyond the SDK's own
//! attempts is `retry.rs`.

use std::time::Duration;

use async_trait::async_trait;

use crate::event::InstanceId;
use crate::outcome::HookResult;

pub mod dynamo;
#[cfg(test)]
pub mod fake;
pub mod sdk;

/// A failed AWS call, classified once ([`ErrorClass::of`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{operation}: {}{message} ({class})", code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub struct AwsError {
    pub operation: &'static str,
    pub code: Option<String>,
    pub message: String,
    pub class: ErrorClass,
}

impl AwsError {
    /// An error found on this side (a request that cannot be built, an answer that makes
    /// no sense): never worth another try.
    pub fn permanent(operation: &'static str, message: impl Into<String>) -> Self {
        Self {
            operation,
            code: None,
            message: message.into(),
            class: ErrorClass::Local,
        }
    }

    /// Throttling, 5xx, timeouts and connection failures: worth another try later.
    pub fn retryable(&self) -> bool {
        self.class.is_transient()
    }
}

/// What kind of failure an AWS call met: the one place that decides whether trying again
/// can help. Transient classes are retried (by the SDK, then with backoff, then by keeping
/// the message in flight); permanent ones end what they were for and say why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Rate limits: a throttling code, or HTTP 429.
    Throttled,
    /// The service's own trouble: a 5xx with or without a code (a proxy's HTML page),
    /// `ResourceContention`, `InternalFailure`, `ServiceUnavailable`.
    Server,
    /// No answer in time.
    Timeout,
    /// The connection failed or broke (refused, reset, DNS).
    Connection,
    /// The request was refused as invalid (4xx `ValidationError`, `InvalidParameter...`).
    Validation,
    /// What the request names does not exist (4xx `...NotFound`, `NoSuch...`).
    NotFound,
    /// Not allowed, or not authenticated (4xx `AccessDenied`, `UnauthorizedOperation`).
    Access,
    /// Any other 4xx.
    Client,
    /// Found on this side, not by AWS (a request that cannot be built, an odd answer).
    Local,
}

impl ErrorClass {
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorClass::Throttled
                | ErrorClass::Server
                | ErrorClass::Timeout
                | ErrorClass::Connection
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Throttled => "transient: throttled",
            ErrorClass::Server => "transient: server error",
            ErrorClass::Timeout => "transient: timeout",
            ErrorClass::Connection => "transient: connection error",
            ErrorClass::Validation => "permanent: invalid request",
            ErrorClass::NotFound => "permanent: not found",
            ErrorClass::Access => "permanent: access denied",
            ErrorClass::Client => "permanent: client error",
            ErrorClass::Local => "permanent",
        }
    }

    /// The class of an answer AWS (or something in between) gave: its HTTP status and its
    /// error code, when it had one. The code wins where it is known; the status decides
    /// the rest, so any 5xx is transient and any other 4xx permanent.
    pub fn of(status: Option<u16>, code: Option<&str>) -> ErrorClass {
        if let Some(class) = code.and_then(class_of_code) {
            return class;
        }
        match status {
            Some(429) => ErrorClass::Throttled,
            Some(500..=599) => ErrorClass::Server,
            Some(408) => ErrorClass::Timeout,
            Some(401 | 403) => ErrorClass::Access,
            Some(404) => ErrorClass::NotFound,
            Some(400..=499) => ErrorClass::Client,
            // No status (no answer was read), or a 2xx/3xx that failed to parse.
            _ => ErrorClass::Server,
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The class an error code names, when it names one.
fn class_of_code(code: &str) -> Option<ErrorClass> {
    let class = match code {
        "Throttling"
        | "ThrottlingException"
        | "ThrottledException"
        | "RequestThrottled"
        | "RequestThrottledException"
        | "RequestLimitExceeded"
        | "TooManyRequestsException"
        | "SlowDown"
        | "EC2ThrottledException"
        | "BandwidthLimitExceeded"
        | "ProvisionedThroughputExceededException"
        | "TransactionInProgressException" => ErrorClass::Throttled,
        "ResourceContention"
        | "PriorRequestNotComplete"
        | "InternalFailure"
        | "InternalError"
        | "InternalErrorException"
        | "InternalServerError"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "Unavailable" => ErrorClass::Server,
        "RequestTimeout" | "RequestTimeoutException" => ErrorClass::Timeout,
        // SQS: a receipt that is stale, or a message no longer in flight.
        "ReceiptHandleIsInvalid" | "MessageNotInflight" => ErrorClass::Validation,
        "AccessDenied"
        | "AccessDeniedException"
        | "UnauthorizedOperation"
        | "AuthFailure"
        | "InvalidClientTokenId"
        | "UnrecognizedClientException"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "ExpiredToken"
        | "ExpiredTokenException"
        | "MissingAuthenticationToken"
        | "OptInRequired" => ErrorClass::Access,
        c if c.contains("NotFound") || c.starts_with("NoSuch") || c.contains("DoesNotExist") => {
            ErrorClass::NotFound
        }
        c if c.starts_with("Validation")
            || c.starts_with("InvalidParameter")
            || c.starts_with("MissingParameter")
            || c.starts_with("Invalid")
            || c.starts_with("Malformed") =>
        {
            ErrorClass::Validation
        }
        _ => return None,
    };
    Some(class)
}

/// One message as received from SQS.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: String,
    pub receipt: String,
    pub body: String,
    pub receive_count: u32,
}

/// Per-entry outcome of a batch call: `Err` carries that entry's error text.
pub type BatchResult = Vec<Result<(), String>>;

#[async_trait]
pub trait Queue: Send + Sync {
    async fn receive(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Message>, AwsError>;
    /// DeleteMessageBatch; at most 10 receipts.
    async fn delete_batch(&self, receipts: &[String]) -> Result<BatchResult, AwsError>;
    /// ChangeMessageVisibilityBatch; at most 10 entries. Zero releases a message at once.
    async fn change_visibility_batch(
        &self,
        entries: &[(String, Duration)],
    ) -> Result<BatchResult, AwsError>;
    /// The queue's RedrivePolicy attribute, when it has one (a dead-letter queue is set up).
    async fn redrive_policy(&self) -> Result<Option<String>, AwsError>;
}

/// Identifies one lifecycle action for the Auto Scaling API.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Action {
    pub group: String,
    pub hook: String,
    pub instance_id: InstanceId,
    /// The action's token; None completes or heartbeats by instance id (manual runs,
    /// where no message carried a token).
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HookInfo {
    pub heartbeat_timeout: Duration,
    pub default_result: HookResult,
    /// autoscaling:EC2_INSTANCE_LAUNCHING | autoscaling:EC2_INSTANCE_TERMINATING
    pub transition: String,
    pub notification_target: Option<String>,
    pub notification_metadata: Option<String>,
}

/// An instance's place in Auto Scaling (DescribeAutoScalingInstances).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub instance_id: String,
    pub group: String,
    /// Pending:Wait, InService, Terminating:Wait, Warmed:Pending:Wait, ...
    pub state: String,
}

/// A group's warm pool (DescribeWarmPool): its configuration and the instances in it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WarmPool {
    pub min_size: i32,
    /// None: the group's MaxSize.
    pub max_group_prepared_capacity: Option<i32>,
    /// Stopped | Running | Hibernated
    pub pool_state: String,
    /// Scale-in returns instances to the pool (InstanceReusePolicy.ReuseOnScaleIn).
    pub reuse_on_scale_in: bool,
    /// The pool's instances with their lifecycle states (Warmed:Pending:Wait, Warmed:Stopped...).
    pub instances: Vec<Membership>,
}

/// What CompleteLifecycleAction / RecordLifecycleActionHeartbeat said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionCall {
    Done,
    /// "No active Lifecycle Action found": completed by someone else, or timed out.
    NotActive(String),
}

#[async_trait]
pub trait Hooks: Send + Sync {
    /// Every lifecycle hook of a group, by hook name (one DescribeLifecycleHooks call).
    async fn describe_hooks(&self, group: &str) -> Result<Vec<(String, HookInfo)>, AwsError>;
    async fn heartbeat(&self, action: &Action) -> Result<ActionCall, AwsError>;
    async fn complete(&self, action: &Action, result: HookResult) -> Result<ActionCall, AwsError>;
    /// The group an instance belongs to and its lifecycle state (DescribeAutoScalingInstances);
    /// None when it is in no group.
    async fn membership(&self, instance: &InstanceId) -> Result<Option<Membership>, AwsError>;
    /// Every member of a group with its lifecycle state, from one DescribeAutoScalingGroups
    /// call (empty when the group does not exist).
    async fn group_members(&self, group: &str) -> Result<Vec<Membership>, AwsError>;
    /// The group one instance belongs to and its lifecycle state.
    async fn instance_group(
        &self,
        instance: &InstanceId,
    ) -> Result<Option<(String, String)>, AwsError> {
        Ok(self.membership(instance).await?.map(|m| (m.group, m.state)))
    }
    /// Every Auto Scaling group name (DescribeAutoScalingGroups, all pages).
    async fn groups(&self) -> Result<Vec<String>, AwsError>;
    /// The group's warm pool (DescribeWarmPool), None when it has none.
    async fn warm_pool(&self, _group: &str) -> Result<Option<WarmPool>, AwsError> {
        Ok(None)
    }
}

/// What DescribeInstances says about one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    /// pending | running | shutting-down | terminated | stopping | stopped
    pub state: String,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    pub private_dns: Option<String>,
    pub public_dns: Option<String>,
    pub tags: std::collections::BTreeMap<String, String>,
}

#[async_trait]
pub trait Instances: Send + Sync {
    /// CreateTags on one instance (tags differ per instance, so this cannot be batched).
    async fn create_tags(
        &self,
        instance: &InstanceId,
        tags: &[(String, String)],
    ) -> Result<(), AwsError>;
    /// DescribeInstances for many instances (one call per 200 ids). Unknown ids are simply
    /// absent from the answer, never an error.
    async fn describe(&self, ids: &[InstanceId]) -> Result<Vec<InstanceInfo>, AwsError>;
    /// GetConsoleOutput, decoded from base64; None while the instance has no output yet.
    /// (EC2 has no batch form of this call.)
    async fn console_output(&self, instance: &InstanceId) -> Result<Option<String>, AwsError>;
}

/// One Run Command request, the same for every instance it targets.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SsmCommand {
    pub document: String,
    pub parameters: std::collections::BTreeMap<String, Vec<String>>,
    /// Delivery timeout (SendCommand's TimeoutSeconds); the run time is the document's.
    pub timeout_seconds: Option<i32>,
    pub comment: Option<String>,
    pub output_s3_bucket: Option<String>,
    pub output_s3_prefix: Option<String>,
    pub cloudwatch_log_group: Option<String>,
}

/// One instance's part of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub instance_id: String,
    /// Pending | InProgress | Delayed | Success | Cancelled | Cancelling | TimedOut | Failed
    pub status: String,
    pub status_details: String,
    pub response_code: Option<i32>,
    pub output: String,
}

impl Invocation {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "Success" | "Cancelled" | "TimedOut" | "Failed"
        )
    }
}

#[async_trait]
pub trait Ssm: Send + Sync {
    /// Which of these instances (at most 50) have an SSM agent that is Online.
    async fn online(&self, ids: &[InstanceId]) -> Result<Vec<String>, AwsError>;
    /// SendCommand to at most 50 instances; returns the command id.
    async fn send_command(&self, cmd: &SsmCommand, ids: &[InstanceId]) -> Result<String, AwsError>;
    /// Every invocation of a command (ListCommandInvocations with details, all pages).
    async fn invocations(&self, command_id: &str) -> Result<Vec<Invocation>, AwsError>;
    async fn cancel(&self, command_id: &str, ids: &[InstanceId]) -> Result<(), AwsError>;
    /// GetParameter WithDecryption (a SecureString's plain text).
    async fn parameter(&self, name: &str) -> Result<crate::secret::Secret, AwsError>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwStack {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwLayer {
    pub id: String,
    pub shortname: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwInstance {
    pub id: String,
    pub ec2_instance_id: Option<String>,
    pub hostname: Option<String>,
    pub status: String,
    pub layer_ids: Vec<String>,
}

/// The OpsWorks Stacks calls the opsworks step makes, in a given region.
#[async_trait]
pub trait OpsWorks: Send + Sync {
    async fn stacks(&self, region: &str) -> Result<Vec<OwStack>, AwsError>;
    async fn layers(&self, region: &str, stack_id: &str) -> Result<Vec<OwLayer>, AwsError>;
    async fn instances(&self, region: &str, stack_id: &str) -> Result<Vec<OwInstance>, AwsError>;
    async fn instance(&self, region: &str, id: &str) -> Result<Option<OwInstance>, AwsError>;
    async fn hostname_suggestion(&self, region: &str, layer_id: &str) -> Result<String, AwsError>;
    async fn register(
        &self,
        region: &str,
        stack_id: &str,
        hostname: &str,
        ec2: &InstanceInfo,
    ) -> Result<String, AwsError>;
    async fn assign(&self, region: &str, id: &str, layer_id: &str) -> Result<(), AwsError>;
    async fn deregister(&self, region: &str, id: &str) -> Result<(), AwsError>;
}

#[async_trait]
pub trait Notifier: Send + Sync {
    /// PublishBatch; at most 10 messages.
    async fn publish_batch(
        &self,
        topic_arn: &str,
        messages: &[String],
    ) -> Result<BatchResult, AwsError>;
    /// GetTopicAttributes: the topic exists and may be read (`provision check --aws`).
    async fn check_topic(&self, topic_arn: &str) -> Result<(), AwsError>;
}

/// An EC2 instance's place in an ECS cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInstance {
    pub arn: String,
    /// ACTIVE | DRAINING | REGISTERING | DEREGISTERING | ...
    pub status: String,
    pub running_tasks: i32,
}

/// The ECS calls the ecs_drain step makes.
#[async_trait]
pub trait Ecs: Send + Sync {
    /// The cluster's container instance on an EC2 instance (ListContainerInstances with the
    /// filter `ec2InstanceId == ID`, then DescribeContainerInstances); None when the
    /// instance is not registered in the cluster.
    async fn container_instance(
        &self,
        cluster: &str,
        ec2: &InstanceId,
    ) -> Result<Option<ContainerInstance>, AwsError>;
    /// DescribeContainerInstances for one container instance; None when it is gone
    /// (deregistered).
    async fn describe_container_instance(
        &self,
        cluster: &str,
        arn: &str,
    ) -> Result<Option<ContainerInstance>, AwsError>;
    /// UpdateContainerInstancesState to DRAINING: services move their tasks elsewhere.
    async fn drain(&self, cluster: &str, arn: &str) -> Result<(), AwsError>;
}

/// The AWS services a step may call.
#[derive(Clone)]
pub struct Services {
    pub instances: std::sync::Arc<dyn Instances>,
    pub ssm: std::sync::Arc<dyn Ssm>,
    pub opsworks: std::sync::Arc<dyn OpsWorks>,
    pub ecs: std::sync::Arc<dyn Ecs>,
}

#[cfg(test)]
mod tests {
    use super::ErrorClass::{self, *};

    fn of(status: u16, code: Option<&str>) -> ErrorClass {
        ErrorClass::of(Some(status), code)
    }

    #[test]
    fn throttling_is_transient() {
        for code in [
            "Throttling",
            "ThrottlingException",
            "RequestThrottled",
            "RequestLimitExceeded",
            "TooManyRequestsException",
            "SlowDown",
        ] {
            assert_eq!(of(400, Some(code)), Throttled, "{code}");
        }
        assert_eq!(of(429, None), Throttled);
        assert!(Throttled.is_transient());
    }

    #[test]
    fn resource_contention_and_every_5xx_are_transient() {
        // AWS documents ResourceContention (HTTP 500) for CompleteLifecycleAction.
        assert_eq!(of(500, Some("ResourceContention")), Server);
        assert_eq!(of(500, Some("InternalFailure")), Server);
        // A 5xx whose code nobody knows, or without any (a proxy's HTML page).
        assert_eq!(of(500, Some("SomethingNew")), Server);
        assert_eq!(of(502, None), Server);
        assert_eq!(of(503, None), Server);
        assert_eq!(of(504, None), Server);
        assert!(Server.is_transient());
    }

    #[test]
    fn timeouts_and_connection_errors_are_transient() {
        assert_eq!(of(408, None), Timeout);
        assert_eq!(of(400, Some("RequestTimeout")), Timeout);
        assert!(Timeout.is_transient() && Connection.is_transient());
        // An answer that could not be read at all.
        assert_eq!(ErrorClass::of(None, None), Server);
    }

    #[test]
    fn validation_errors_are_permanent_and_say_so() {
        assert_eq!(of(400, Some("ValidationError")), Validation);
        assert_eq!(of(400, Some("InvalidParameterValue")), Validation);
        assert_eq!(of(400, Some("MissingParameter")), Validation);
        assert_eq!(
            ErrorClass::of(None, Some("ReceiptHandleIsInvalid")),
            Validation
        );
        assert!(!Validation.is_transient());
        assert_eq!(Validation.as_str(), "permanent: invalid request");
    }

    #[test]
    fn not_found_is_permanent_and_says_so() {
        assert_eq!(of(400, Some("InvalidInstanceID.NotFound")), NotFound);
        assert_eq!(
            of(400, Some("AWS.SimpleQueueService.NonExistentQueue")),
            Client
        );
        assert_eq!(of(404, Some("NoSuchEntity")), NotFound);
        assert_eq!(of(400, Some("ResourceNotFoundException")), NotFound);
        assert_eq!(of(404, None), NotFound);
        assert!(!NotFound.is_transient());
    }

    #[test]
    fn access_errors_are_permanent_and_say_so() {
        assert_eq!(of(403, Some("AccessDenied")), Access);
        assert_eq!(of(400, Some("AccessDeniedException")), Access);
        assert_eq!(of(403, Some("UnauthorizedOperation")), Access);
        assert_eq!(of(403, None), Access);
        assert!(!Access.is_transient());
        assert_eq!(of(418, None), Client);
    }

    #[test]
    fn the_code_wins_over_the_status_where_it_is_known() {
        // SQS's throttling answer is a 400; a validation code under a 500 is still invalid.
        assert_eq!(of(400, Some("RequestThrottled")), Throttled);
        assert_eq!(of(500, Some("ValidationError")), Validation);
    }

    #[test]
    fn the_message_names_the_class() {
        let e = super::AwsError {
            operation: "autoscaling:CompleteLifecycleAction",
            code: Some("ResourceContention".into()),
            message: "busy".into(),
            class: Server,
        };
        assert!(e.retryable());
        assert_eq!(
            e.to_string(),
            "autoscaling:CompleteLifecycleAction: ResourceContention: busy (transient: server error)"
        );
    }
}

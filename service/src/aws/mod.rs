//! The AWS boundary: narrow traits that speak this project's types, and their SDK impls.
//!
//! The pipeline never sees an SDK type. Each trait is the handful of calls one concern needs
//! (the queue, the hooks, the instances, the result topic), so unit tests can hand in small
//! fakes and the integration tests drive the real SDK against the emulator. One file per
//! service holds its trait, the types it speaks and its SDK impl (`sqs.rs`, `autoscaling.rs`,
//! `ec2.rs`, `ssm.rs`, `opsworks.rs`, `sns.rs`, `ecs.rs`; claims in `dynamo.rs`); `sdk.rs`
//! holds what they share: the SDK config and the mapping of SDK errors. Classifying errors
//! (retryable or not) happens here, once; retrying beyond the SDK's own attempts is
//! [`crate::retry`].

/// An enum for a closed vocabulary AWS answers with (a lifecycle state, a status), parsed
/// once where the SDK's answer is read, as the SDK's own enums are (`from(&str)`): a variant
/// per word, and `Other` keeping a word this version does not know (AWS adds states).
/// `as_str` gives the word back, for logs and messages. No word at all (a field AWS left
/// out) is `Other("")`, the default.
macro_rules! vocabulary {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $word:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A word this version does not know, kept as AWS sent it.
            Other(String),
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $word,)*
                    Self::Other(word) => word,
                }
            }
        }

        impl From<&str> for $name {
            fn from(word: &str) -> Self {
                match word {
                    $($word => Self::$variant,)*
                    other => Self::Other(other.to_string()),
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::Other(String::new())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub mod autoscaling;
pub mod dynamo;
pub mod ec2;
pub mod ecs;
#[cfg(test)]
pub mod fake;
pub mod history;
pub mod opsworks;
pub mod sdk;
pub mod sns;
pub mod sqs;
pub mod ssm;

pub use autoscaling::{
    Action, ActionCall, GroupView, HookInfo, Hooks, LifecycleState, Membership, WarmPoolState,
};
pub use ec2::{InstanceInfo, InstanceState, Instances};
pub use ecs::{ContainerInstance, ContainerInstanceStatus, Ecs};
pub use opsworks::{OpsWorks, OwInstance, OwLayer, OwStack};
pub use sns::Notifier;
pub use sqs::{Message, Queue};
pub use ssm::{Invocation, InvocationStatus, Ssm, SsmCommand};

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
    /// The request's credentials or signature went stale on the way: a session token that
    /// expired before the SDK refreshed it (`ExpiredToken`), a clock step that made the
    /// signature's time wrong (`RequestExpired`, `SignatureDoesNotMatch`,
    /// `RequestTimeTooSkewed`). The next attempt signs afresh with refreshed credentials.
    Credentials,
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
                | ErrorClass::Credentials
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Throttled => "transient: throttled",
            ErrorClass::Server => "transient: server error",
            ErrorClass::Timeout => "transient: timeout",
            ErrorClass::Connection => "transient: connection error",
            ErrorClass::Credentials => "transient: stale credentials or signature",
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
        "ExpiredToken"
        | "ExpiredTokenException"
        | "RequestExpired"
        | "SignatureDoesNotMatch"
        | "RequestTimeTooSkewed"
        | "InvalidSignatureException" => ErrorClass::Credentials,
        // SQS: a receipt that is stale, or a message no longer in flight.
        "ReceiptHandleIsInvalid" | "MessageNotInflight" => ErrorClass::Validation,
        "AccessDenied"
        | "AccessDeniedException"
        | "UnauthorizedOperation"
        | "AuthFailure"
        | "InvalidClientTokenId"
        | "UnrecognizedClientException"
        | "IncompleteSignature"
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

/// Per-entry outcome of a batch call: `Err` carries that entry's error, classified.
pub type BatchResult = Vec<Result<(), AwsError>>;

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
    fn stale_credentials_and_clock_blips_are_transient_and_denials_are_not() {
        // A session token refreshed late, or a clock step at signing: the next attempt signs
        // afresh. Completing must not give up on them (the hook would time out).
        for code in [
            "ExpiredToken",
            "ExpiredTokenException",
            "RequestExpired",
            "SignatureDoesNotMatch",
            "RequestTimeTooSkewed",
        ] {
            assert_eq!(of(400, Some(code)), Credentials, "{code}");
        }
        assert!(Credentials.is_transient());
        assert_eq!(of(403, Some("AccessDenied")), Access);
        assert_eq!(of(403, Some("InvalidClientTokenId")), Access);
        assert!(!Access.is_transient());
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
    fn failed_batch_entries_are_classified_by_their_code() {
        use super::sdk::failed_entry;
        let op = "sqs:ChangeMessageVisibilityBatch";
        let stale = failed_entry(op, "ReceiptHandleIsInvalid", Some("expired"));
        assert!(!stale.retryable(), "{stale}");
        assert!(failed_entry(op, "InternalError", Some("try again")).retryable());
        assert!(failed_entry(op, "", None).retryable());
    }

    #[test]
    fn a_vocabulary_keeps_a_word_it_does_not_know() {
        use crate::aws::LifecycleState;
        let waiting = LifecycleState::from("Warmed:Pending:Wait");
        assert_eq!(waiting, LifecycleState::WarmedPendingWait);
        assert_eq!(waiting.to_string(), "Warmed:Pending:Wait");
        let new = LifecycleState::from("Warmed:Pending:Later");
        assert_eq!(new, LifecycleState::Other("Warmed:Pending:Later".into()));
        assert!(new.is_warmed() && !new.is_terminating());
        assert_eq!(LifecycleState::default().as_str(), "");
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

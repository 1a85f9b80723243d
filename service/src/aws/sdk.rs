//! What every SDK client here shares: the SDK config (region, credentials and endpoint from
//! the standard chain, so `AWS_ENDPOINT_URL` points everything at an emulator with no special
//! code path) and the mapping of SDK errors to [`AwsError`].

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};

use super::{AwsError, BatchResult, ErrorClass};

/// Loads the shared SDK config: standard retry mode with `max_attempts` tries per call
/// (`aws.max_attempts`), each attempt given `attempt_timeout` (`aws.attempt_timeout`).
pub async fn load_config(max_attempts: u32, attempt_timeout: Duration) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    // Credentials that were in the environment live in memory only (secret::scrub_environment):
    // children never inherit them.
    if let Some(c) = crate::secret::env_credentials() {
        loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
            c.access_key_id,
            c.secret_access_key.expose(),
            c.session_token.map(|t| t.expose().to_string()),
            None,
            "environment",
        ));
    }
    loader
        // Shows as app/provision in the User-Agent (CloudTrail, and the emulator's counters).
        .app_name(aws_config::AppName::new("provision").expect("a valid app name"))
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(max_attempts)
                .with_initial_backoff(Duration::from_millis(200)),
        )
        // A long poll holds the connection for up to `queue.wait_time`: the config keeps the
        // attempt timeout above that.
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(attempt_timeout)
                .build(),
        )
        .load()
        .await
}

/// Turns any SDK error into an [`AwsError`]; [`ErrorClass::of`] decides from the answer's
/// HTTP status and error code whether it is worth retrying.
pub(super) fn classify<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let class = match &err {
        SdkError::TimeoutError(_) => ErrorClass::Timeout,
        SdkError::DispatchFailure(f) if f.is_timeout() => ErrorClass::Timeout,
        SdkError::DispatchFailure(f) if f.is_user() => ErrorClass::Local,
        SdkError::DispatchFailure(_) => ErrorClass::Connection,
        SdkError::ResponseError(_) => ErrorClass::of(status, None),
        SdkError::ServiceError(_) => ErrorClass::of(status, err.code()),
        _ => ErrorClass::Local,
    };
    match &err {
        SdkError::ServiceError(_) => AwsError {
            operation,
            code: err.code().map(str::to_string),
            message: match (err.message(), status) {
                (Some(m), _) => m.to_string(),
                (None, Some(s)) => format!("HTTP {s} without an error message"),
                (None, None) => "no message".to_string(),
            },
            class,
        },
        _ => AwsError {
            operation,
            code: None,
            message: aws_smithy_error_chain(&err),
            class,
        },
    }
}

/// The error and its sources on one line (`a: b: c`).
fn aws_smithy_error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut src = err.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// One entry a batch call failed, classified by its code (one nobody knows: transient).
pub(super) fn failed_entry(operation: &'static str, code: &str, message: Option<&str>) -> AwsError {
    AwsError {
        operation,
        code: Some(code.to_string()),
        message: message.unwrap_or("").to_string(),
        class: ErrorClass::of(None, Some(code)),
    }
}

/// Every entry's result of a batch call of `n` entries (ids "0", "1", ...), from the ones it
/// failed.
pub(super) fn batch_result(
    n: usize,
    failed: impl Iterator<Item = (String, AwsError)>,
) -> BatchResult {
    let mut out: BatchResult = vec![Ok(()); n];
    for (id, err) in failed {
        if let Some(slot) = id.parse::<usize>().ok().and_then(|i| out.get_mut(i)) {
            *slot = Err(err);
        }
    }
    out
}

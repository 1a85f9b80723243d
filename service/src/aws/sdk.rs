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
use crate::metrics::CountCalls;

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

/// The SDK config of a source's calls: its region, and when it names a role, credentials
/// of that role (AssumeRole with its external id, through `base`'s credentials and
/// endpoint, renewed before they expire by the config's identity cache). Nothing is called
/// here: a role that cannot be assumed fails the source's first call, and every call after
/// that tries again. The AssumeRole calls are counted in `calls` (service `sts`).
pub async fn source_config(
    base: &aws_config::SdkConfig,
    source: &crate::sources::SourceConfig,
    calls: &CountCalls,
) -> aws_config::SdkConfig {
    let mut b = base.to_builder();
    let region = source.region.clone().map(aws_config::Region::new);
    if let Some(r) = &region {
        b = b.region(r.clone());
    }
    if let Some(role) = &source.role {
        let provider = AssumeRole::new(base, region, role, calls);
        b = b.credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
            provider,
        ));
    }
    b.build()
}

/// A source role's credentials: one AssumeRole call each time the identity cache asks
/// (at first use, then before they expire). aws-config's `AssumeRoleProvider` makes the
/// same call, but through an STS client of its own that takes no interceptor, so its calls
/// could not be counted with every other AWS call.
struct AssumeRole {
    call: aws_sdk_sts::operation::assume_role::builders::AssumeRoleFluentBuilder,
}

/// The role only: the call's own Debug prints its input, external id included, and the
/// SDK logs its credentials providers' Debug at trace level.
impl std::fmt::Debug for AssumeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssumeRole")
            .field("role_arn", &self.call.get_role_arn())
            .finish_non_exhaustive()
    }
}

impl AssumeRole {
    fn new(
        base: &aws_config::SdkConfig,
        region: Option<aws_config::Region>,
        role: &crate::sources::AssumeRole,
        calls: &CountCalls,
    ) -> AssumeRole {
        // As aws-config's provider: the host's credentials are not cached by this client
        // (the source's config caches what it gets); STS in the source's region.
        let mut conf = base
            .to_builder()
            .identity_cache(aws_sdk_sts::config::IdentityCache::no_cache());
        if let Some(r) = region {
            conf = conf.region(r);
        }
        let sts = aws_sdk_sts::config::Builder::from(&conf.build())
            .interceptor(calls.clone())
            .build();
        let call = aws_sdk_sts::Client::from_conf(sts)
            .assume_role()
            .role_arn(&role.arn)
            .role_session_name(session_name(crate::claims::hostname()))
            .set_external_id(role.external_id.clone());
        AssumeRole { call }
    }

    async fn credentials(&self) -> aws_credential_types::provider::Result {
        use aws_credential_types::provider::error::CredentialsError;
        let out = self
            .call
            .clone()
            .send()
            .await
            .map_err(CredentialsError::provider_error)?;
        let c = out
            .credentials
            .ok_or_else(|| CredentialsError::unhandled("AssumeRole answered no credentials"))?;
        let expiry = std::time::SystemTime::try_from(c.expiration)
            .map_err(|e| CredentialsError::unhandled(format!("AssumeRole's expiration: {e}")))?;
        Ok(aws_sdk_sqs::config::Credentials::new(
            c.access_key_id,
            c.secret_access_key,
            Some(c.session_token),
            Some(expiry),
            "AssumeRole",
        ))
    }
}

impl aws_sdk_sqs::config::ProvideCredentials for AssumeRole {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(self.credentials())
    }
}

/// Whether `sdk_cfg`'s credentials can be had now (for a source with a role: AssumeRole
/// answers); the error with its causes when not.
pub async fn credentials_work(sdk_cfg: &aws_config::SdkConfig) -> Result<(), String> {
    use aws_sdk_sqs::config::ProvideCredentials as _;
    let Some(provider) = sdk_cfg.credentials_provider() else {
        return Err("no credentials are configured".into());
    };
    provider
        .provide_credentials()
        .await
        .map(|_| ())
        .map_err(|e| aws_smithy_error_chain(&e))
}

/// The role session's name, which the member account's CloudTrail shows:
/// `provision-HOST`, within STS's 64 characters of `\w+=,.@-`.
fn session_name(host: &str) -> String {
    let host: String = host
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '+' | '=' | ',' | '.' | '@' | '-' | '_' => c,
            _ => '-',
        })
        .collect();
    let mut name = format!("provision-{host}");
    name.truncate(64);
    name
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
        SdkError::DispatchFailure(_) => credentials_failure(&err).unwrap_or(ErrorClass::Connection),
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

/// A request that never left because its credentials could not be had (a source's role
/// could not be assumed): refused (`AccessDenied`, as AWS says when the role does not
/// exist or does not trust the caller) is not worth retrying soon; anything else from STS
/// (throttled, unreachable) is a transient credentials error.
fn credentials_failure(err: &(dyn std::error::Error + 'static)) -> Option<ErrorClass> {
    let chain = aws_smithy_error_chain(err);
    if !chain.contains("error occurred while loading credentials") {
        return None;
    }
    Some(match chain.contains("AccessDenied") {
        true => ErrorClass::Access,
        false => ErrorClass::Credentials,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_call_prints_its_role_and_never_its_external_id() {
        let base = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        let role = crate::sources::AssumeRole {
            arn: "arn:aws:iam::210987654321:role/provision-member".into(),
            external_id: Some("ops-7f3a".into()),
        };
        let calls = CountCalls(std::sync::Arc::new(crate::metrics::Stats::default()));
        let a = AssumeRole::new(&base, None, &role, &calls);
        let shown = format!("{a:?}");
        assert!(shown.contains("role/provision-member"), "{shown}");
        assert!(!shown.contains("ops-7f3a"), "{shown}");
        // What the redaction is for: the SDK's own Debug of the call shows the input.
        assert!(format!("{:?}", a.call).contains("ops-7f3a"));
    }

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);

    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn a_role_that_cannot_be_assumed_is_refused_and_sts_trouble_is_transient() {
        let creds = |inner: &'static str| {
            E(
                "dispatch failure",
                Some(Box::new(E(
                    "an error occurred while loading credentials",
                    Some(Box::new(E(inner, None))),
                ))),
            )
        };
        let denied = creds("unhandled error (AccessDenied): User: x is not authorized");
        assert_eq!(credentials_failure(&denied), Some(ErrorClass::Access));
        assert_eq!(
            credentials_failure(&creds("service error: Throttling")),
            Some(ErrorClass::Credentials)
        );
        assert_eq!(credentials_failure(&E("connection refused", None)), None);
        assert_eq!(session_name("ops-1.example"), "provision-ops-1.example");
        assert_eq!(session_name(&"h/".repeat(40)).len(), 64);
        assert!(session_name("a b/c").ends_with("a-b-c"));
    }
}

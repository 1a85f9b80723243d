//! Message body -> [`Parsed`]: a lifecycle event, a skip, or a reject.
//!
//! Owns the three shapes a lifecycle notification takes on its way to the queue (straight
//! from the hook, inside an SNS envelope, as an EventBridge event), the validation of
//! everything in it, which is untrusted, and what its Origin and Destination mean
//! ([`Phase`]: a plain launch or termination, or an instance entering, leaving or returning
//! to a warm pool). Pure: no I/O, no clock, no config. What to *do*
//! with an event (routing, claiming, completing) lives elsewhere.
//!
//! A direct lifecycle message, as Auto Scaling posts it to an SQS target
//! (the same JSON as `tests/fixtures/events/direct-launch.json`):
//!
//! ```json
//! {"Origin":"EC2","LifecycleHookName":"provision-launch","Destination":"AutoScalingGroup",
//!  "AccountId":"123456789012","RequestId":"6a0b6f3c-7c1e-4a43-9e0a-0c5f3c1d2e4f",
//!  "LifecycleTransition":"autoscaling:EC2_INSTANCE_LAUNCHING","AutoScalingGroupName":"web-prod",
//!  "Service":"AWS Auto Scaling","Time":"2026-11-21T10:15:42.113Z",
//!  "EC2InstanceId":"i-0a1b2c3d4e5f60718",
//!  "NotificationMetadata":"{\"environment\":\"production\",\"platform\":\"web\",\"major\":\"3\"}",
//!  "LifecycleActionToken":"71514b9d-6a40-4b26-8523-05e7ee35fa40"}
//! ```
//!
//! A message without `LifecycleActionToken` is rejected rather than completed by instance id:
//! AWS always sends a token, and completing by instance id could finish an action this message
//! never described.

use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

/// Longest group or hook name AWS allows (both are 1..=255 characters).
const MAX_NAME_LEN: usize = 255;
/// Lifecycle action tokens are UUIDs; allow some slack but refuse anything unbounded.
const MAX_TOKEN_LEN: usize = 64;
/// NotificationMetadata is at most 1023 characters in AWS.
const MAX_METADATA_LEN: usize = 1023;
/// `Time` (an RFC 3339 instant, 24 characters from AWS) and `AccountId` (12 digits): what
/// AWS sends fits with room to spare; more is refused, so nobody stores a sender's megabytes.
const MAX_SHORT_FIELD_LEN: usize = 64;

/// What a message body turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Event(LifecycleEvent),
    /// EC2 warns that an instance is going away (a Spot interruption) or should be replaced
    /// (a rebalance recommendation): not a lifecycle action, nothing to complete.
    Interruption(Interruption),
    /// Well-formed, but nothing to do (test notification, another event type). Delete it.
    Skip(Skip),
    /// Malformed or unsafe. Never completed; recorded, then deleted or dead-lettered.
    Reject(Reject),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("test notification for group {group:?} (sent once when a hook is created)")]
    TestNotification { group: String },
    #[error("EventBridge event {detail_type:?} from {source_name:?} is not a lifecycle action")]
    OtherEventBridgeEvent {
        detail_type: String,
        source_name: String,
    },
    #[error("Auto Scaling event {event:?} is not a lifecycle action")]
    OtherAutoScalingEvent { event: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is JSON but not an object (found {0})")]
    NotAnObject(&'static str),
    #[error("SNS envelope's Message is not a JSON object: {0}")]
    BadSnsMessage(String),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("field {field} must be a string")]
    NotAString { field: &'static str },
    #[error("field {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("EC2InstanceId {0:?} does not match i-[0-9a-f]{{8,17}}")]
    BadInstanceId(String),
    #[error("unknown LifecycleTransition {0:?}")]
    UnknownTransition(String),
    #[error("not a recognised lifecycle message (no LifecycleTransition, Event, detail-type or SNS Type)")]
    Unrecognised,
}

/// An instance id that matched `i-[0-9a-f]{8,17}`: safe to put in a path, a tag or a log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct InstanceId(String);

impl InstanceId {
    pub fn parse(s: &str) -> Result<Self, Reject> {
        let hex = s
            .strip_prefix("i-")
            .ok_or_else(|| Reject::BadInstanceId(truncate(s, 64)))?;
        let ok = (8..=17).contains(&hex.len())
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(Reject::BadInstanceId(truncate(s, 64)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transition {
    Launch,
    Terminate,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Launch => "launch",
            Transition::Terminate => "terminate",
        }
    }

    pub fn aws_name(self) -> &'static str {
        match self {
            Transition::Launch => "autoscaling:EC2_INSTANCE_LAUNCHING",
            Transition::Terminate => "autoscaling:EC2_INSTANCE_TERMINATING",
        }
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an instance comes from or goes to in a lifecycle action (`Origin`, `Destination`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Place {
    /// Launched or terminated: outside Auto Scaling.
    #[serde(rename = "EC2")]
    Ec2,
    AutoScalingGroup,
    /// The group's warm pool: prepared, then stopped (or hibernated, or running) until needed.
    WarmPool,
}

impl Place {
    pub fn parse(s: &str) -> Option<Place> {
        match s {
            "EC2" => Some(Place::Ec2),
            "AutoScalingGroup" => Some(Place::AutoScalingGroup),
            "WarmPool" => Some(Place::WarmPool),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Place::Ec2 => "EC2",
            Place::AutoScalingGroup => "AutoScalingGroup",
            Place::WarmPool => "WarmPool",
        }
    }
}

/// What a lifecycle action means for the instance: its transition read together with its
/// Origin and Destination (the Auto Scaling user guide's warm-pool event reference). A
/// layer runs one step list per phase ([`crate::layer::Layer::steps`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// LAUNCHING, EC2 -> AutoScalingGroup (or no Origin/Destination): a plain launch.
    Launch,
    /// LAUNCHING, EC2 -> WarmPool: a new instance entering the warm pool
    /// (`Warmed:Pending:Wait`); it stops once the action completes.
    PoolEnter,
    /// LAUNCHING, WarmPool -> AutoScalingGroup: a pool instance started for a scale-out
    /// (`Pending:Wait`).
    PoolLeave,
    /// TERMINATING, AutoScalingGroup -> WarmPool: scale-in with instance reuse; the instance
    /// goes back to the pool (`Warmed:Pending:Wait`) and comes back later.
    PoolReturn,
    /// TERMINATING, to EC2 (from the group, or from the pool: `Warmed:Terminating:Wait`).
    Terminate,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Launch => "launch",
            Phase::PoolEnter => "pool-enter",
            Phase::PoolLeave => "pool-leave",
            Phase::PoolReturn => "pool-return",
            Phase::Terminate => "terminate",
        }
    }

    pub fn transition(self) -> Transition {
        match self {
            Phase::Launch | Phase::PoolEnter | Phase::PoolLeave => Transition::Launch,
            Phase::PoolReturn | Phase::Terminate => Transition::Terminate,
        }
    }

    /// The phase of a transition between two places. Absent places (messages from before
    /// warm pools) read as the plain transition.
    pub fn of(transition: Transition, origin: Option<Place>, destination: Option<Place>) -> Phase {
        match (transition, origin, destination) {
            (Transition::Launch, _, Some(Place::WarmPool)) => Phase::PoolEnter,
            (Transition::Launch, Some(Place::WarmPool), _) => Phase::PoolLeave,
            (Transition::Launch, _, _) => Phase::Launch,
            (Transition::Terminate, _, Some(Place::WarmPool)) => Phase::PoolReturn,
            (Transition::Terminate, _, _) => Phase::Terminate,
        }
    }

    /// Whether the instance stays with the group (in service or in its pool) afterwards, so
    /// that what provision knows of it (its host keys) must be kept.
    pub fn instance_stays(self) -> bool {
        self != Phase::Terminate
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the message reached the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Envelope {
    Direct,
    Sns,
    EventBridge,
    /// No message: `provision <instance-id>`.
    Manual,
    /// No message: found by the reconciler (`provision reconcile`, the daemon's passes).
    Reconcile,
}

/// NotificationMetadata: a JSON object (readable as `{metadata.KEY}`) or opaque text.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(untagged)]
pub enum Metadata {
    #[default]
    None,
    Json(Map<String, Value>),
    Text(String),
}

impl Metadata {
    pub fn parse(raw: Option<&str>) -> Metadata {
        match raw {
            None => Metadata::None,
            Some(s) if s.trim().is_empty() => Metadata::None,
            Some(s) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(map)) => Metadata::Json(map),
                _ => Metadata::Text(s.to_string()),
            },
        }
    }

    /// A metadata value as template text. Strings verbatim; numbers and booleans as JSON;
    /// objects, arrays and null are not scalar and yield `None`.
    pub fn get(&self, key: &str) -> Option<String> {
        match self {
            Metadata::Json(map) => match map.get(key)? {
                Value::String(s) => Some(s.clone()),
                v @ (Value::Number(_) | Value::Bool(_)) => Some(v.to_string()),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Metadata::None => "no NotificationMetadata",
            Metadata::Json(_) => "JSON NotificationMetadata",
            Metadata::Text(_) => "plain-text NotificationMetadata",
        }
    }
}

/// One lifecycle action, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LifecycleEvent {
    pub instance_id: InstanceId,
    pub group: String,
    pub hook: String,
    pub transition: Transition,
    pub token: String,
    /// `EC2`, `AutoScalingGroup` or `WarmPool` ([`Place`]; checked when parsed); absent in
    /// messages from before warm pools (2021).
    pub origin: Option<Place>,
    pub destination: Option<Place>,
    pub metadata: Metadata,
    pub account_id: Option<String>,
    pub time: Option<String>,
    pub envelope: Envelope,
}

impl LifecycleEvent {
    /// What the action means for the instance (launch, entering or leaving the warm pool,
    /// returning to it, terminate).
    pub fn phase(&self) -> Phase {
        Phase::of(self.transition, self.origin, self.destination)
    }
}

/// What EC2 told about an instance through EventBridge (source `aws.ec2`).
///
/// ```json
/// {"version": "0", "id": "…", "detail-type": "EC2 Spot Instance Interruption Warning",
///  "source": "aws.ec2", "account": "123456789012", "time": "2026-12-02T01:00:00Z",
///  "region": "us-east-1", "resources": ["arn:aws:ec2:us-east-1a:instance/i-1234567890abcdef0"],
///  "detail": {"instance-id": "i-1234567890abcdef0", "instance-action": "terminate"}}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interruption {
    pub instance_id: InstanceId,
    pub kind: InterruptionKind,
    /// The event's time, as EC2 sent it.
    pub time: String,
    /// When the instance goes (ms since the epoch): two minutes after a Spot interruption
    /// warning; None for a rebalance recommendation.
    pub deadline_ms: Option<i64>,
}

/// Which warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InterruptionKind {
    /// `EC2 Spot Instance Interruption Warning`: the instance is stopped, hibernated or
    /// terminated two minutes after `time`.
    SpotInterruption,
    /// `EC2 Instance Rebalance Recommendation`: the instance is at elevated risk; the
    /// group's Capacity Rebalancing replaces it.
    RebalanceRecommendation,
}

impl InterruptionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InterruptionKind::SpotInterruption => "spot-interruption",
            InterruptionKind::RebalanceRecommendation => "rebalance-recommendation",
        }
    }
}

/// How long EC2 gives a Spot instance after its interruption warning.
pub const SPOT_NOTICE: std::time::Duration = std::time::Duration::from_secs(120);

/// An `aws.ec2` EventBridge event this service acts on, when `obj` is one.
fn interruption(obj: &Map<String, Value>, detail_type: &str) -> Option<Result<Parsed, Reject>> {
    let kind = match detail_type {
        "EC2 Spot Instance Interruption Warning" => InterruptionKind::SpotInterruption,
        "EC2 Instance Rebalance Recommendation" => InterruptionKind::RebalanceRecommendation,
        _ => return None,
    };
    Some((|| {
        let detail = match obj.get("detail") {
            Some(Value::Object(d)) => d,
            Some(_) => return Err(Reject::NotAString { field: "detail" }),
            None => return Err(Reject::Missing("detail")),
        };
        let id = str_field(detail, "instance-id")?;
        let instance_id =
            InstanceId::parse(id).map_err(|_| Reject::BadInstanceId(truncate(id, 40)))?;
        let time = str_field(obj, "time")?;
        let sent = humantime::parse_rfc3339_weak(time).map_err(|e| Reject::Invalid {
            field: "time",
            reason: e.to_string(),
        })?;
        let sent_ms = sent
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let deadline_ms = (kind == InterruptionKind::SpotInterruption)
            .then(|| sent_ms + SPOT_NOTICE.as_millis() as i64);
        Ok(Parsed::Interruption(Interruption {
            instance_id,
            kind,
            time: truncate(time, 40),
            deadline_ms,
        }))
    })())
}

/// Parse a message body. Never panics, never does I/O.
pub fn parse(body: &str) -> Parsed {
    match parse_inner(body) {
        Ok(p) => p,
        Err(r) => Parsed::Reject(r),
    }
}

fn parse_inner(body: &str) -> Result<Parsed, Reject> {
    let value: Value = serde_json::from_str(body).map_err(|e| Reject::NotJson(e.to_string()))?;
    let obj = as_object(value)?;

    // SNS envelope (raw message delivery off): the lifecycle message is a JSON string.
    if obj.get("Type").and_then(Value::as_str) == Some("Notification")
        && obj.contains_key("Message")
    {
        let inner = str_field(&obj, "Message")?;
        let inner: Value =
            serde_json::from_str(inner).map_err(|e| Reject::BadSnsMessage(e.to_string()))?;
        let inner = match inner {
            Value::Object(m) => m,
            other => return Err(Reject::BadSnsMessage(format!("found {}", kind(&other)))),
        };
        return from_lifecycle_fields(&inner, Envelope::Sns);
    }

    // EventBridge event.
    if let Some(detail_type) = obj.get("detail-type") {
        let detail_type = detail_type.as_str().unwrap_or_default();
        let source = obj
            .get("source")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let lifecycle = source == "aws.autoscaling"
            && matches!(
                detail_type,
                "EC2 Instance-launch Lifecycle Action" | "EC2 Instance-terminate Lifecycle Action"
            );
        if source == "aws.ec2" {
            if let Some(parsed) = interruption(&obj, detail_type) {
                return parsed;
            }
        }
        if !lifecycle {
            return Ok(Parsed::Skip(Skip::OtherEventBridgeEvent {
                detail_type: truncate(detail_type, 100),
                source_name: truncate(source, 100),
            }));
        }
        let detail = match obj.get("detail") {
            Some(Value::Object(d)) => d,
            Some(_) => return Err(Reject::NotAString { field: "detail" }),
            None => return Err(Reject::Missing("detail")),
        };
        // The detail carries no AccountId or Time: EventBridge states them on the envelope.
        let mut parsed = from_lifecycle_fields(detail, Envelope::EventBridge)?;
        if let Parsed::Event(e) = &mut parsed {
            if e.account_id.is_none() {
                e.account_id = short_field(&obj, "account")?.map(str::to_string);
            }
            if e.time.is_none() {
                e.time = short_field(&obj, "time")?.map(str::to_string);
            }
        }
        return Ok(parsed);
    }

    from_lifecycle_fields(&obj, Envelope::Direct)
}

fn from_lifecycle_fields(obj: &Map<String, Value>, envelope: Envelope) -> Result<Parsed, Reject> {
    if let Some(event) = obj.get("Event").and_then(Value::as_str) {
        if event == "autoscaling:TEST_NOTIFICATION" {
            let group = opt_str(obj, "AutoScalingGroupName")?.unwrap_or_default();
            return Ok(Parsed::Skip(Skip::TestNotification {
                group: truncate(group, MAX_NAME_LEN),
            }));
        }
        if !obj.contains_key("LifecycleTransition") {
            return Ok(Parsed::Skip(Skip::OtherAutoScalingEvent {
                event: truncate(event, 100),
            }));
        }
    }
    let transition = match opt_str(obj, "LifecycleTransition")? {
        Some("autoscaling:EC2_INSTANCE_LAUNCHING") => Transition::Launch,
        Some("autoscaling:EC2_INSTANCE_TERMINATING") => Transition::Terminate,
        Some(other) => return Err(Reject::UnknownTransition(truncate(other, 100))),
        None => return Err(Reject::Unrecognised),
    };
    let instance_id = InstanceId::parse(str_field(obj, "EC2InstanceId")?)?;
    let group = name_field(obj, "AutoScalingGroupName")?;
    let hook = name_field(obj, "LifecycleHookName")?;
    let token = str_field(obj, "LifecycleActionToken")?;
    let token_ok = !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !token_ok {
        return Err(Reject::Invalid {
            field: "LifecycleActionToken",
            reason: "expected a UUID-like token of letters, digits and dashes".into(),
        });
    }
    let raw_metadata = opt_str(obj, "NotificationMetadata")?;
    if raw_metadata.is_some_and(|m| m.len() > MAX_METADATA_LEN) {
        return Err(Reject::Invalid {
            field: "NotificationMetadata",
            reason: format!("longer than {MAX_METADATA_LEN} characters"),
        });
    }
    let origin = place_field(obj, "Origin")?;
    let destination = place_field(obj, "Destination")?;
    Ok(Parsed::Event(LifecycleEvent {
        instance_id,
        group: group.to_string(),
        hook: hook.to_string(),
        transition,
        token: token.to_string(),
        origin,
        destination,
        metadata: Metadata::parse(raw_metadata),
        account_id: short_field(obj, "AccountId")?.map(str::to_string),
        time: short_field(obj, "Time")?.map(str::to_string),
        envelope,
    }))
}

/// `Origin` / `Destination`: absent, or one of the places AWS documents.
fn place_field(obj: &Map<String, Value>, field: &'static str) -> Result<Option<Place>, Reject> {
    match opt_str(obj, field)? {
        None => Ok(None),
        Some(s) => match Place::parse(s) {
            Some(p) => Ok(Some(p)),
            None => Err(Reject::Invalid {
                field,
                reason: format!(
                    "{:?} is not a place; expected EC2, AutoScalingGroup or WarmPool",
                    truncate(s, 40)
                ),
            }),
        },
    }
}

fn as_object(value: Value) -> Result<Map<String, Value>, Reject> {
    match value {
        Value::Object(m) => Ok(m),
        other => Err(Reject::NotAnObject(kind(&other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, field: &'static str) -> Result<&'a str, Reject> {
    opt_str(obj, field)?.ok_or(Reject::Missing(field))
}

fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, Reject> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Reject::NotAString { field }),
    }
}

/// An optional field AWS keeps short (`Time`, `AccountId`): refused when longer than
/// [`MAX_SHORT_FIELD_LEN`] or holding control characters.
fn short_field<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, Reject> {
    let s = opt_str(obj, field)?;
    if s.is_some_and(|s| s.len() > MAX_SHORT_FIELD_LEN || s.chars().any(char::is_control)) {
        return Err(Reject::Invalid {
            field,
            reason: format!("longer than {MAX_SHORT_FIELD_LEN} characters, or not printable"),
        });
    }
    Ok(s)
}

/// Group and hook names: AWS allows 1..=255 characters without control characters. They are
/// data, never shell text; we only refuse what could corrupt a log line or a tag.
fn name_field<'a>(obj: &'a Map<String, Value>, field: &'static str) -> Result<&'a str, Reject> {
    let s = str_field(obj, field)?;
    if s.is_empty() || s.chars().count() > MAX_NAME_LEN {
        return Err(Reject::Invalid {
            field,
            reason: format!("must be 1 to {MAX_NAME_LEN} characters"),
        });
    }
    if s.chars().any(char::is_control) {
        return Err(Reject::Invalid {
            field,
            reason: "contains control characters".into(),
        });
    }
    Ok(s)
}

fn truncate(s: &str, max: usize) -> String {
    let clean: String = s.chars().filter(|c| !c.is_control()).take(max).collect();
    if s.chars().count() > max {
        format!("{clean}…")
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: &str) -> LifecycleEvent {
        match parse(body) {
            Parsed::Event(e) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[test]
    fn instance_ids() {
        assert!(InstanceId::parse("i-4c87e963").is_ok());
        assert!(InstanceId::parse("i-0a1b2c3d4e5f60718").is_ok());
        for bad in [
            "i-4c87e96",
            "i-0a1b2c3d4e5f607189",
            "i-0A1B2C3D",
            "x-12345678",
            "i-0a1b2c3d; rm -rf /",
            "",
            "i-",
        ] {
            assert!(InstanceId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn metadata_json_and_text() {
        let m = Metadata::parse(Some(r#"{"a":"x","n":3,"b":true,"o":{}}"#));
        assert_eq!(m.get("a").as_deref(), Some("x"));
        assert_eq!(m.get("n").as_deref(), Some("3"));
        assert_eq!(m.get("b").as_deref(), Some("true"));
        assert_eq!(m.get("o"), None);
        assert_eq!(m.get("missing"), None);
        assert_eq!(
            Metadata::parse(Some("role=web")),
            Metadata::Text("role=web".into())
        );
        assert_eq!(Metadata::parse(Some("[1]")), Metadata::Text("[1]".into()));
        assert_eq!(Metadata::parse(None), Metadata::None);
    }

    #[test]
    fn fields_a_sender_could_make_huge_are_bounded() {
        let huge = "9".repeat(200_000);
        for field in ["Time", "AccountId"] {
            let mut body = serde_json::json!({
                "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
                "AutoScalingGroupName": "g", "LifecycleHookName": "h",
                "EC2InstanceId": "i-0123456789abcdef0",
                "LifecycleActionToken": "0e1d2c3b-4a59-4687-9a1b-2c3d4e5f6a01",
                "Time": "2026-11-21T10:20:00.000Z", "AccountId": "123456789012",
            });
            assert!(matches!(parse(&body.to_string()), Parsed::Event(_)));
            body[field] = huge.clone().into();
            assert!(
                matches!(parse(&body.to_string()), Parsed::Reject(Reject::Invalid { field: f, .. }) if f == field),
                "{field}"
            );
        }
    }

    #[test]
    fn non_string_fields_are_rejected_not_coerced() {
        let body = r#"{"LifecycleTransition":"autoscaling:EC2_INSTANCE_LAUNCHING","AutoScalingGroupName":"g","EC2InstanceId":12345678,"LifecycleHookName":"h","LifecycleActionToken":"t"}"#;
        assert_eq!(
            parse(body),
            Parsed::Reject(Reject::NotAString {
                field: "EC2InstanceId"
            })
        );
    }

    #[test]
    fn control_characters_in_names_are_rejected() {
        let body = r#"{"LifecycleTransition":"autoscaling:EC2_INSTANCE_LAUNCHING","AutoScalingGroupName":"web\nprod","EC2InstanceId":"i-12345678","LifecycleHookName":"h","LifecycleActionToken":"t"}"#;
        assert!(matches!(
            parse(body),
            Parsed::Reject(Reject::Invalid {
                field: "AutoScalingGroupName",
                ..
            })
        ));
    }

    #[test]
    fn token_must_look_like_a_token() {
        let body = r#"{"LifecycleTransition":"autoscaling:EC2_INSTANCE_LAUNCHING","AutoScalingGroupName":"g","EC2InstanceId":"i-12345678","LifecycleHookName":"h","LifecycleActionToken":"$(id)"}"#;
        assert!(matches!(
            parse(body),
            Parsed::Reject(Reject::Invalid {
                field: "LifecycleActionToken",
                ..
            })
        ));
    }

    #[test]
    fn eventbridge_detail_is_read() {
        let e = event(
            r#"{"detail-type":"EC2 Instance-terminate Lifecycle Action","source":"aws.autoscaling","detail":{"LifecycleActionToken":"abc-1","AutoScalingGroupName":"g","LifecycleHookName":"h","EC2InstanceId":"i-12345678","LifecycleTransition":"autoscaling:EC2_INSTANCE_TERMINATING"}}"#,
        );
        assert_eq!(e.transition, Transition::Terminate);
        assert_eq!(e.envelope, Envelope::EventBridge);
    }

    fn with_places(transition: &str, origin: &str, destination: &str) -> Parsed {
        let body = serde_json::json!({
            "LifecycleTransition": transition, "AutoScalingGroupName": "g",
            "EC2InstanceId": "i-12345678", "LifecycleHookName": "h", "LifecycleActionToken": "t",
            "Origin": origin, "Destination": destination,
        });
        parse(&body.to_string())
    }

    #[test]
    fn origin_and_destination_give_the_phase() {
        const L: &str = "autoscaling:EC2_INSTANCE_LAUNCHING";
        const T: &str = "autoscaling:EC2_INSTANCE_TERMINATING";
        let cases = [
            (L, "EC2", "AutoScalingGroup", Phase::Launch),
            (L, "EC2", "WarmPool", Phase::PoolEnter),
            (L, "WarmPool", "AutoScalingGroup", Phase::PoolLeave),
            (T, "AutoScalingGroup", "WarmPool", Phase::PoolReturn),
            (T, "AutoScalingGroup", "EC2", Phase::Terminate),
            (T, "WarmPool", "EC2", Phase::Terminate),
        ];
        for (t, o, d, phase) in cases {
            match with_places(t, o, d) {
                Parsed::Event(e) => {
                    assert_eq!(e.phase(), phase, "{o} -> {d}");
                    assert_eq!(phase.transition(), e.transition);
                }
                other => panic!("{other:?}"),
            }
        }
        let legacy = event(
            r#"{"LifecycleTransition":"autoscaling:EC2_INSTANCE_TERMINATING","AutoScalingGroupName":"g","EC2InstanceId":"i-12345678","LifecycleHookName":"h","LifecycleActionToken":"t"}"#,
        );
        assert_eq!(legacy.phase(), Phase::Terminate);
        assert!(Phase::PoolReturn.instance_stays() && !Phase::Terminate.instance_stays());
    }

    #[test]
    fn unknown_places_are_rejected_with_the_field() {
        let r = with_places(
            "autoscaling:EC2_INSTANCE_LAUNCHING",
            "EC2",
            "Pool; rm -rf /",
        );
        match r {
            Parsed::Reject(
                e @ Reject::Invalid {
                    field: "Destination",
                    ..
                },
            ) => {
                assert!(e.to_string().contains("WarmPool"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_never_panics() {
        for body in [
            "",
            "null",
            "1",
            "\"s\"",
            "{",
            "{\"Type\":\"Notification\",\"Message\":5}",
            "{\"detail-type\":7}",
            "{\"Event\":[]}",
        ] {
            let _ = parse(body);
        }
    }
}

/// Properties of the parser over generated bodies: it never panics, every reject has a
/// reason, and what it produces is bounded whatever it is given.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Longest reason a reject may carry, whatever the body's size.
    const REASON_MAX: usize = 600;

    fn check(body: &str) {
        match parse(body) {
            Parsed::Event(e) => {
                let id = e.instance_id.as_str();
                assert!(
                    id.starts_with("i-") && (10..=19).contains(&id.len()),
                    "{id}"
                );
                assert!(!e.token.is_empty());
            }
            Parsed::Skip(s) => assert!(!s.to_string().is_empty()),
            Parsed::Interruption(i) => {
                let id = i.instance_id.as_str();
                assert!(
                    id.starts_with("i-") && (10..=19).contains(&id.len()),
                    "{id}"
                );
            }
            Parsed::Reject(r) => {
                let reason = r.to_string();
                assert!(!reason.trim().is_empty(), "a reject without a reason");
                assert!(
                    reason.len() <= REASON_MAX,
                    "{} bytes: {reason:.200}",
                    reason.len()
                );
            }
        }
    }

    /// A JSON value of any kind, strings of any size and content.
    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "\\PC{0,40}".prop_map(Value::from),
            "[a-f0-9-]{0,20}".prop_map(|s| Value::from(format!("i-{s}"))),
            prop::collection::vec(any::<char>(), 0..3000)
                .prop_map(|c| Value::from(c.into_iter().collect::<String>())),
            Just(Value::from("autoscaling:EC2_INSTANCE_LAUNCHING")),
            Just(Value::from("autoscaling:TEST_NOTIFICATION")),
        ]
    }

    /// A lifecycle message with each field present or not, of any value.
    fn lifecycle() -> impl Strategy<Value = Value> {
        let fields = [
            "LifecycleTransition",
            "AutoScalingGroupName",
            "LifecycleHookName",
            "EC2InstanceId",
            "LifecycleActionToken",
            "NotificationMetadata",
            "Origin",
            "Destination",
            "Time",
            "Event",
        ];
        prop::collection::vec(prop::option::of(value()), fields.len()).prop_map(move |vals| {
            let mut m = serde_json::Map::new();
            for (k, v) in fields.iter().zip(vals) {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            Value::Object(m)
        })
    }

    /// The same, as it comes directly, in an SNS envelope, or as an EventBridge event.
    fn body() -> impl Strategy<Value = String> {
        (lifecycle(), 0..3u8).prop_map(|(msg, shape)| match shape {
            0 => msg.to_string(),
            1 => {
                serde_json::json!({"Type": "Notification", "Message": msg.to_string()}).to_string()
            }
            _ => serde_json::json!({
                "detail-type": "EC2 Instance-launch Lifecycle Action",
                "source": "aws.autoscaling", "detail": msg,
            })
            .to_string(),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_text_gets_an_answer(s in "\\PC{0,400}") {
            check(&s);
        }

        #[test]
        fn any_bytes_as_text_get_an_answer(b in prop::collection::vec(any::<u8>(), 0..2000)) {
            check(&String::from_utf8_lossy(&b));
        }

        #[test]
        fn any_lifecycle_shaped_body_gets_an_answer(b in body()) {
            check(&b);
        }

        #[test]
        fn a_good_message_with_one_field_spoiled_is_never_an_event_with_a_bad_id(
            id in "\\PC{0,40}", token in "\\PC{0,40}"
        ) {
            let b = serde_json::json!({
                "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
                "AutoScalingGroupName": "g", "LifecycleHookName": "h",
                "EC2InstanceId": id, "LifecycleActionToken": token,
            });
            check(&b.to_string());
        }
    }
}

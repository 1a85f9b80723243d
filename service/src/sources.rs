//! The queues a daemon reads, and whose account and region each one's work belongs to.
//!
//! Owns `[sources.NAME]` (a queue URL, its region, optionally a role in the member account
//! to assume with an external id), what a queue URL says about its account and region, and
//! the scope a source's runs carry (metrics labels, claim keys, result events). `[queue]`'s
//! `url` stays the one-source form: the source named [`DEFAULT_SOURCE`], read with the host's
//! own credentials and region. Building the SDK config that assumes a source's role is
//! `aws::sdk`'s; which sources a reload adds or removes is `reload`'s.

use crate::setting::{quoted, ConfigError, Fields};

/// The name of the source `[queue] url` configures.
pub const DEFAULT_SOURCE: &str = "queue";

/// The most sources one config may name: each is a receive loop, and its account and
/// region are metric labels (bounded cardinality).
pub const MAX_SOURCES: usize = 64;

/// One queue to read and where its work happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// `sources.NAME`, or [`DEFAULT_SOURCE`] for `[queue] url`.
    pub name: String,
    pub url: String,
    /// The region of the queue and of every call for its messages; None: the host's
    /// (`AWS_REGION`, the profile), which only the `[queue]` form leaves unset.
    pub region: Option<String>,
    /// The role to assume for the source's calls; None: the host's own credentials.
    pub role: Option<AssumeRole>,
}

/// `role_arn` and `external_id` of a source.
#[derive(Clone, PartialEq, Eq)]
pub struct AssumeRole {
    pub arn: String,
    /// What the member account's trust policy asks for (`sts:ExternalId`).
    pub external_id: Option<String>,
}

/// The external id is no secret by AWS's book, but it is one guard of the role: kept out
/// of logs all the same.
impl std::fmt::Debug for AssumeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssumeRole")
            .field("arn", &self.arn)
            .field("external_id", &self.external_id.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl AssumeRole {
    /// The role's account (the 12 digits of its ARN).
    pub fn account(&self) -> Option<&str> {
        self.arn.split(':').nth(4).filter(|a| is_account(a))
    }
}

impl SourceConfig {
    /// The account the source's calls act in: the role's, else the queue URL's; None when
    /// neither says (a URL of an unusual shape, host credentials).
    pub fn account(&self) -> Option<&str> {
        match &self.role {
            Some(r) => r.account(),
            None => url_account(&self.url),
        }
    }
}

/// What [`Scope`] says of an account or region nobody could tell.
pub const UNKNOWN: &str = "unknown";

/// Where a source's work belongs: its account and region, as labels and records name them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub account: String,
    pub region: String,
}

impl Scope {
    /// `account` and `region`, "unknown" for what nobody could say.
    pub fn new(account: Option<&str>, region: Option<&str>) -> Scope {
        Scope {
            account: account.unwrap_or(UNKNOWN).to_string(),
            region: region.unwrap_or(UNKNOWN).to_string(),
        }
    }
}

/// How a run's history row names its source: `{"account": …, "region": …}` in its event.
pub fn scope_json(scope: &Scope) -> serde_json::Value {
    serde_json::json!({ "account": scope.account, "region": scope.region })
}

fn is_account(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

/// The account in a queue URL's path (`https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`).
pub fn url_account(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let mut parts = rest.split('/');
    let _host = parts.next()?;
    parts.next().filter(|a| is_account(a))
}

/// The region in an AWS queue URL's host: `sqs.REGION.amazonaws.com` (also `.com.cn`) or
/// the legacy `REGION.queue.amazonaws.com`; None for other hosts (an endpoint of one's own).
pub fn url_region(url: &str) -> Option<&str> {
    let host = url.split_once("://")?.1.split(['/', ':']).next()?;
    let labels: Vec<&str> = host.split('.').collect();
    let region = match labels.as_slice() {
        ["sqs", region, "amazonaws", "com", ..] => region,
        [region, "queue", "amazonaws", "com", ..] => region,
        _ => return None,
    };
    valid_region(region).then_some(region)
}

/// `us-east-1`, `eu-central-2`, `us-gov-west-1`, `ap-southeast-5`.
pub fn valid_region(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].parse::<u8>().is_ok_and(|n| n > 0)
}

/// An IAM role ARN: `arn:PARTITION:iam::ACCOUNT:role/[PATH/]NAME`.
fn valid_role_arn(arn: &str) -> Result<(), String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [arn_word, partition, service, region, account, resource] = parts.as_slice() else {
        return Err("is not an ARN (arn:aws:iam::ACCOUNT:role/NAME)".into());
    };
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
    };
    let role = resource.strip_prefix("role/").unwrap_or("");
    let name = role.rsplit('/').next().unwrap_or("");
    if *arn_word != "arn"
        || !matches!(*partition, "aws" | "aws-cn" | "aws-us-gov")
        || *service != "iam"
        || !region.is_empty()
        || arn.len() > 2048
    {
        return Err("is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)".into());
    }
    if !is_account(account) {
        return Err(format!("{account:?} is not an account id (12 digits)"));
    }
    if !name_ok(name) {
        return Err("does not name a role (role/NAME, at most 64 of a-z A-Z 0-9 +=,.@_-)".into());
    }
    Ok(())
}

/// An external id as STS accepts it: 2 to 1224 of `\w+=,.@:/-`.
fn valid_external_id(id: &str) -> bool {
    (2..=1224).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@:/-".contains(&b))
}

/// A source's name: it appears in logs and errors.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `[sources.NAME]` in file order, after the `[queue] url` source when there is one
/// (`default`). Every problem is collected with its key.
pub fn all_from_raw(
    default: Option<SourceConfig>,
    raw: Option<&toml::Table>,
    errs: &mut Vec<ConfigError>,
) -> Vec<SourceConfig> {
    let mut out: Vec<SourceConfig> = default.into_iter().collect();
    let Some(raw) = raw else { return out };
    if raw.len() > MAX_SOURCES {
        errs.push(ConfigError::new(
            "sources",
            format!("{} sources; at most {MAX_SOURCES}", raw.len()),
        ));
    }
    for (name, v) in raw {
        let key = format!("sources.{name}");
        let Some(t) = v.as_table() else {
            errs.push(ConfigError::new(
                key,
                "must be a table: [sources.NAME] with url, region, role_arn, external_id",
            ));
            continue;
        };
        if !valid_name(name) || name == DEFAULT_SOURCE {
            errs.push(ConfigError::new(
                &key,
                format!("{name:?} is not a source name (1 to 64 of a-z A-Z 0-9 - _; not \"{DEFAULT_SOURCE}\", which is [queue]'s)"),
            ));
        }
        let Some(source) = from_table(name, t, errs) else {
            continue;
        };
        if let Some(first) = out.iter().find(|s| same_queue(&s.url, &source.url)) {
            let first = match first.name.as_str() {
                DEFAULT_SOURCE => "queue.url".to_string(),
                n => format!("sources.{n}"),
            };
            errs.push(ConfigError::new(
                format!("{key}.url"),
                format!("the same queue as {first}: each queue is read by one source"),
            ));
            continue;
        }
        out.push(source);
    }
    out
}

/// Whether two queue URLs name the same queue (scheme, a trailing slash and the host's case
/// aside: queue names are case-sensitive).
fn same_queue(a: &str, b: &str) -> bool {
    let norm = |u: &str| {
        let rest = u
            .split_once("://")
            .map_or(u, |(_, r)| r)
            .trim_end_matches('/');
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        (host.to_ascii_lowercase(), path.to_string())
    };
    norm(a) == norm(b)
}

/// One `[sources.NAME]` table; None when it cannot be used at all.
fn from_table(name: &str, t: &toml::Table, errs: &mut Vec<ConfigError>) -> Option<SourceConfig> {
    let mut f = Fields::new(Some(t), format!("sources.{name}"), errs);
    let url = match f.required(
        "url",
        "missing: the SQS queue this source's lifecycle hooks notify",
    ) {
        Some(v) => match v.as_str() {
            Some(u) if u.starts_with("https://") || u.starts_with("http://") => Some(u.to_string()),
            _ => {
                f.error(
                    "url",
                    format!(
                        "{} is not a queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)",
                        quoted(v)
                    ),
                );
                None
            }
        },
        None => None,
    };
    let region = f.with("region", |v| match v.as_str() {
        Some(r) if valid_region(r) => Ok(r.to_string()),
        _ => Err(format!(
            "{} is not a region (e.g. \"eu-west-1\")",
            quoted(v)
        )),
    });
    let role_arn = f.with("role_arn", |v| {
        let arn = v
            .as_str()
            .ok_or("must be a string (arn:aws:iam::ACCOUNT:role/NAME)")?;
        valid_role_arn(arn).map_err(|m| format!("{arn:?} {m}"))?;
        Ok(arn.to_string())
    });
    let external_id = f.with("external_id", |v| match v.as_str() {
        Some(id) if valid_external_id(id) => Ok(id.to_string()),
        _ => Err(
            "must be 2 to 1224 of a-z A-Z 0-9 _+=,.@:/- (what the role's trust policy asks for)"
                .to_string(),
        ),
    });
    if external_id.is_some() && !t.contains_key("role_arn") {
        f.error("external_id", "only means something with role_arn");
    }
    let section = format!("[sources.{name}]");
    let Some(url) = url else {
        f.finish_section(&section);
        return None;
    };
    let region = match (region, url_region(&url)) {
        (Some(r), Some(u)) if r != u => {
            f.error(
                "region",
                format!("{r:?}, but the queue URL is in {u:?}: a queue is read in its own region"),
            );
            Some(r)
        }
        (Some(r), _) => Some(r),
        (None, Some(u)) => Some(u.to_string()),
        (None, None) => {
            f.error(
                "region",
                "missing, and the queue URL does not say it (sqs.REGION.amazonaws.com)",
            );
            None
        }
    };
    f.finish_section(&section);
    Some(SourceConfig {
        name: name.to_string(),
        url,
        region,
        role: role_arn.map(|arn| AssumeRole { arn, external_id }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<SourceConfig>, Vec<String>) {
        let t: toml::Table = toml::from_str(text).unwrap();
        let mut errs = Vec::new();
        let got = all_from_raw(None, t.get("sources").and_then(|v| v.as_table()), &mut errs);
        (got, errs.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_source_names_its_queue_region_and_role() {
        let (got, errs) = parse(
            r#"
[sources.prod-eu]
url = "https://sqs.eu-west-1.amazonaws.com/210987654321/asg-lifecycle"
role_arn = "arn:aws:iam::210987654321:role/provision-member"
external_id = "ops-7f3a"
[sources.staging]
url = "http://127.0.0.1:5000/123456789012/lifecycle"
region = "us-east-2"
"#,
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "prod-eu");
        assert_eq!(got[0].region.as_deref(), Some("eu-west-1"), "from the URL");
        assert_eq!(got[0].account(), Some("210987654321"));
        let role = got[0].role.as_ref().unwrap();
        assert_eq!(role.external_id.as_deref(), Some("ops-7f3a"));
        assert!(
            !format!("{role:?}").contains("ops-7f3a"),
            "kept out of logs"
        );
        assert_eq!(got[1].region.as_deref(), Some("us-east-2"));
        assert_eq!(got[1].account(), Some("123456789012"), "the URL's");
        assert!(got[1].role.is_none());
    }

    #[test]
    fn the_same_queue_is_told_by_its_host_case_blind_and_its_name_exactly() {
        let a = "https://sqs.eu-west-1.amazonaws.com/210987654321/Lifecycle";
        assert!(same_queue(
            a,
            "http://SQS.eu-west-1.amazonaws.com/210987654321/Lifecycle/"
        ));
        assert!(!same_queue(
            a,
            "https://sqs.eu-west-1.amazonaws.com/210987654321/lifecycle"
        ));
        assert!(!same_queue(
            a,
            "https://sqs.eu-west-1.amazonaws.com/123456789012/Lifecycle"
        ));
    }

    #[test]
    fn every_problem_of_a_source_is_named_by_its_key() {
        let (_, errs) = parse(
            r#"
[sources.a]
url = "https://sqs.eu-west-1.amazonaws.com/210987654321/q"
region = "us-east-1"
role_arn = "arn:aws:iam::2109876:role/x"
rolearn = "x"
[sources.b]
url = "https://sqs.eu-west-1.amazonaws.com/210987654321/q/"
[sources.c]
url = "http://127.0.0.1:5000/123456789012/other"
external_id = "x"
role_arn = "arn:aws:s3:::bucket"
[sources."bad name"]
url = "nope"
"#,
        );
        let keys: Vec<&str> = errs.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "sources.a.role_arn",
                "sources.a.region",
                "sources.a.rolearn",
                "sources.b.url",
                "sources.c.role_arn",
                "sources.c.external_id",
                "sources.c.region",
                "sources.bad name",
                "sources.bad name.url",
            ],
            "{errs:#?}"
        );
        assert!(
            errs[1].contains("the queue URL is in \"eu-west-1\""),
            "{errs:?}"
        );
        assert!(errs[3].contains("the same queue as sources.a"), "{errs:?}");
        assert!(errs[5].contains("2 to 1224"), "{errs:?}");
    }

    #[test]
    fn queue_urls_tell_their_account_and_region() {
        let u = "https://sqs.ap-southeast-2.amazonaws.com/123456789012/q";
        assert_eq!(url_region(u), Some("ap-southeast-2"));
        assert_eq!(url_account(u), Some("123456789012"));
        assert_eq!(
            url_region("https://eu-west-1.queue.amazonaws.com/123456789012/q"),
            Some("eu-west-1")
        );
        assert_eq!(
            url_region("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q"),
            Some("cn-north-1")
        );
        assert_eq!(url_region("http://127.0.0.1:4566/123456789012/q"), None);
        assert_eq!(url_account("https://x/abc/q"), None);
        assert!(
            valid_region("us-gov-west-1") && !valid_region("us-east") && !valid_region("US-east-1")
        );
        assert!(valid_role_arn("arn:aws:iam::123456789012:role/path/to/r-1").is_ok());
        assert!(valid_role_arn("arn:aws:iam::123456789012:user/u").is_err());
    }
}

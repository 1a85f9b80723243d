//! Claims in a DynamoDB table, shared by a fleet of ops hosts (and Lambda's concurrent
//! execution environments): [`crate::claims::Claims`] with conditional writes.
//!
//! One item per lifecycle action token: `token` (the partition key), `state`, `owner`,
//! `lease_until` (ms since the epoch), `result`, `run_id` and `host` (which history holds
//! the run), and `expires_at` (seconds since the epoch: the table's TTL attribute; an item
//! outlives the 48 hours a lifecycle action can last, then DynamoDB deletes it for free).
//!
//! Every operation is one conditional write, so two hosts racing for one token cannot both
//! win: claiming is an UpdateItem that succeeds only on a new token, on a claim that is
//! ours, or on one whose lease expired; losing it costs one strongly consistent GetItem to
//! learn who holds it. A launch costs three writes (claim, decision, done) and a renewal
//! per third of the lease while its steps run, plus two writes for its action key
//! (`action_key.rs`: claimed, deleted when the run ends) and its renewals; with reconcile on, a
//! terminate records its decommissioning (two writes) and a Spot warning its deadline (one).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};

use super::sdk::classify;
use super::AwsError;
use crate::claims::{self, Claim, ClaimError, ClaimState, Claims};
use crate::clock::now_ms;
use crate::metrics::CountCalls;
use crate::outcome::{Completion, HookResult};

/// How long an item stays after its last write before the table's TTL removes it: longer
/// than the 48 hours AWS keeps a lifecycle action, so a late duplicate still finds `done`.
const KEEP: Duration = Duration::from_secs(7 * 86_400);

/// The names every expression uses (several are DynamoDB reserved words).
const NAMES: [(&str, &str); 8] = [
    ("#token", "token"),
    ("#state", "state"),
    ("#owner", "owner"),
    ("#until", "lease_until"),
    ("#result", "result"),
    ("#run", "run_id"),
    ("#host", "host"),
    ("#expires", "expires_at"),
];

pub struct DynamoClaims {
    client: aws_sdk_dynamodb::Client,
    table: String,
    host: String,
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn expires_at() -> AttributeValue {
    n(now_ms() / 1000 + KEEP.as_secs() as i64)
}

/// A stored item as a claim row; None when it is not one of ours.
fn row(item: &HashMap<String, AttributeValue>) -> Option<claims::Row> {
    let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
    let num = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<i64>().ok())
    };
    Some(claims::Row {
        state: ClaimState::parse(&text("state")?),
        owner: text("owner").unwrap_or_default(),
        lease_until_ms: num("lease_until").unwrap_or(0),
        run_id: num("run_id"),
        result: text("result").as_deref().and_then(Completion::parse),
    })
}

impl DynamoClaims {
    pub fn new(cfg: &aws_config::SdkConfig, calls: &CountCalls, table: &str, host: &str) -> Self {
        let conf = aws_sdk_dynamodb::config::Builder::from(cfg)
            .interceptor(calls.clone())
            .build();
        DynamoClaims {
            client: aws_sdk_dynamodb::Client::from_conf(conf),
            table: table.to_string(),
            host: host.to_string(),
        }
    }

    fn error(&self, e: AwsError) -> ClaimError {
        match e.retryable() {
            true => ClaimError::transient(self.describe(), e.to_string()),
            false => ClaimError::new(self.describe(), e.to_string()),
        }
    }

    /// An UpdateItem on `token` with the expression names it uses.
    fn update(
        &self,
        token: &str,
        set: &str,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        let mut b = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("token", s(token))
            .update_expression(set);
        for (placeholder, name) in NAMES {
            if set.contains(placeholder) {
                b = b.expression_attribute_names(placeholder, name);
            }
        }
        b
    }

    /// Sends an update; Ok(None) when its condition did not hold.
    async fn conditional(
        &self,
        operation: &'static str,
        b: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
    ) -> Result<Option<Option<HashMap<String, AttributeValue>>>, ClaimError> {
        match b.send().await {
            Ok(out) => Ok(Some(out.attributes)),
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                Ok(None)
            }
            Err(e) => Err(self.error(classify(operation, e))),
        }
    }

    /// The token's item, read strongly consistent.
    async fn get(&self, token: &str) -> Result<Option<claims::Row>, ClaimError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("token", s(token))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.error(classify("GetItem", e)))?;
        Ok(out.item.as_ref().and_then(row))
    }
}

#[async_trait]
impl Claims for DynamoClaims {
    async fn claim(
        &self,
        token: &str,
        owner: &str,
        run_id: i64,
        lease: Duration,
    ) -> Result<Claim, ClaimError> {
        let now = now_ms();
        // The names in the condition are listed by `update` only when the SET uses them: it
        // uses all of #token's companions, and #token is added here.
        let b = self
            .update(
                token,
                "SET #owner = :me, #until = :until, #run = :run, #host = :host, \
                 #expires = :expires, #state = if_not_exists(#state, :running)",
            )
            .expression_attribute_names("#token", "token")
            .condition_expression(
                "attribute_not_exists(#token) OR \
                 (#state <> :done AND (#until < :now OR #owner = :me))",
            )
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":until", n(now + lease.as_millis() as i64))
            .expression_attribute_values(":run", n(run_id))
            .expression_attribute_values(":host", s(&self.host))
            .expression_attribute_values(":expires", expires_at())
            .expression_attribute_values(":running", s("running"))
            .expression_attribute_values(":done", s("done"))
            .expression_attribute_values(":now", n(now))
            .return_values(ReturnValue::AllOld);
        match self.conditional("UpdateItem", b).await? {
            // Won: what was there before says whether the steps are left or only completion.
            Some(old) => {
                let before = old.as_ref().and_then(row);
                Ok(match before {
                    Some(r) if r.state == ClaimState::Decided => Claim::Decided(r.decision()),
                    Some(r) => Claim::Fresh {
                        from: (r.owner != owner).then_some(r.owner),
                    },
                    None => Claim::Fresh { from: None },
                })
            }
            // Lost: done, or held by a live owner (or expired just now: the caller retries).
            None => {
                let row = self.get(token).await?;
                Ok(match claims::judge(row.as_ref(), owner, now) {
                    Claim::Fresh { .. } | Claim::Decided(_) => Claim::Held {
                        owner: row.map(|r| r.owner).unwrap_or_default(),
                        until_ms: now,
                    },
                    other => other,
                })
            }
        }
    }

    async fn peek(&self, token: &str, owner: &str) -> Result<Claim, ClaimError> {
        Ok(claims::judge(
            self.get(token).await?.as_ref(),
            owner,
            now_ms(),
        ))
    }

    async fn renew(&self, token: &str, owner: &str, lease: Duration) -> Result<bool, ClaimError> {
        let b = self
            .update(token, "SET #until = :until, #expires = :expires")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#state", "state")
            .condition_expression("#owner = :me AND #state <> :done")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":until", n(now_ms() + lease.as_millis() as i64))
            .expression_attribute_values(":expires", expires_at())
            .expression_attribute_values(":done", s("done"));
        Ok(self.conditional("UpdateItem", b).await?.is_some())
    }

    async fn decide(
        &self,
        token: &str,
        owner: &str,
        result: HookResult,
    ) -> Result<bool, ClaimError> {
        let b = self
            .update(
                token,
                "SET #state = :decided, #result = :result, #expires = :expires",
            )
            .expression_attribute_names("#owner", "owner")
            .condition_expression("#owner = :me AND #state <> :done")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":decided", s("decided"))
            .expression_attribute_values(":done", s("done"))
            .expression_attribute_values(":result", s(result.as_str()))
            .expression_attribute_values(":expires", expires_at());
        Ok(self.conditional("UpdateItem", b).await?.is_some())
    }

    async fn done(&self, token: &str, owner: &str, result: Completion) -> Result<bool, ClaimError> {
        let b = self
            .update(
                token,
                "SET #state = :done, #result = :result, #expires = :expires",
            )
            .expression_attribute_names("#owner", "owner")
            .condition_expression("#owner = :me AND #state <> :done")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":done", s("done"))
            .expression_attribute_values(":result", s(result.as_str()))
            .expression_attribute_values(":expires", expires_at());
        Ok(self.conditional("UpdateItem", b).await?.is_some())
    }

    async fn release(&self, token: &str, owner: &str) -> Result<(), ClaimError> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("token", s(token))
            .condition_expression("#owner = :me AND #state = :running")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":running", s("running"))
            .send()
            .await;
        match out {
            Ok(_) => Ok(()),
            // Not ours any more (taken over, decided, done): nothing to forget.
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                Ok(())
            }
            Err(e) => Err(self.error(classify("DeleteItem", e))),
        }
    }

    fn describe(&self) -> String {
        format!("DynamoDB table {}", self.table)
    }
}

/// What `provision check --aws` asks of the table: it exists, is active, is keyed by a
/// string `token`, and has TTL on `expires_at` (a warning when not: items then pile up).
pub async fn check_table(
    cfg: &aws_config::SdkConfig,
    calls: &CountCalls,
    table: &str,
) -> Result<Vec<String>, String> {
    let conf = aws_sdk_dynamodb::config::Builder::from(cfg)
        .interceptor(calls.clone())
        .build();
    let client = aws_sdk_dynamodb::Client::from_conf(conf);
    let out = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| classify("DescribeTable", e).to_string())?;
    let t = out
        .table
        .ok_or_else(|| format!("DescribeTable answered no table for {table}"))?;
    let key: Vec<(String, String)> = t
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.attribute_name().to_string(),
                k.key_type().as_str().to_string(),
            )
        })
        .collect();
    if key != [("token".to_string(), "HASH".to_string())] {
        return Err(format!(
            "table {table} must have the partition key \"token\" (a string) and no sort key; it has {key:?}"
        ));
    }
    let string_key = t
        .attribute_definitions()
        .iter()
        .any(|a| a.attribute_name() == "token" && a.attribute_type().as_str() == "S");
    if !string_key {
        return Err(format!(
            "table {table}: its key \"token\" must be of type S (string)"
        ));
    }
    let status = t.table_status().map(|s| s.as_str().to_string());
    let mut warnings = Vec::new();
    if status.as_deref() != Some("ACTIVE") {
        warnings.push(format!(
            "table {table} is {}, not ACTIVE",
            status.as_deref().unwrap_or("of unknown status")
        ));
    }
    let ttl = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(|e| classify("DescribeTimeToLive", e).to_string())?;
    let ttl_on = ttl.time_to_live_description().is_some_and(|d| {
        d.attribute_name() == Some("expires_at")
            && d.time_to_live_status().map(|s| s.as_str()) == Some("ENABLED")
    });
    if !ttl_on {
        warnings.push(format!(
            "table {table} has no TTL on \"expires_at\": claims of finished actions are never removed"
        ));
    }
    Ok(warnings)
}

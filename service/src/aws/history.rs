//! The fleet's history in a DynamoDB table (`state.history_table`), shared by every ops host
//! (and Lambda's execution environments): `provision history` on any of them shows every
//! host's runs.
//!
//! One item per finished run: `instance_id` (partition key) and `run` (sort key:
//! `<started_at>#<writer>#<run id>`, so an instance's runs come back newest first and two
//! hosts never write the same key), with the run's group, hook, transition, layer, outcome,
//! result, decision, cause, error, account, region, host, steps (JSON, each detail cut short) and
//! `expires_at` (the table's TTL attribute: 90 days, as the local history keeps). A run
//! costs one write of under 1 KB (one write request unit; with on-demand pricing about
//! $1.25 per million launches), sent in BatchWriteItem calls of up to 25. Reading an
//! instance's runs is one Query; filtering by group, account, region or outcome alone scans the
//! table (paid per 4 KB read: a table of 100,000 runs is about 12,500 read units, a few
//! cents a scan).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use serde::{Deserialize, Serialize};

use super::sdk::classify;
use super::AwsError;
use crate::clock::now_ms;
use crate::metrics::CountCalls;
use crate::outcome::{Completion, HookResult, Outcome};
use crate::store::{HistoryFilter, RunRow, StepRow};

/// How long an item stays: the local history's 90 days.
const KEEP: Duration = Duration::from_secs(90 * 86_400);

/// Of each step's detail, the end is kept (where a failure says why).
const DETAIL_MAX: usize = 300;

/// A run as the pipeline hands it over to be written (its result event, plus who wrote it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetRecord {
    pub writer: String,
    pub account_id: Option<String>,
    /// The run's result event (`pipeline::RunReport` as JSON).
    pub run: serde_json::Value,
}

/// A run read back: which host worked it, and the run (with its account and region).
#[derive(Debug, Clone, Serialize)]
pub struct FleetRun {
    pub host: String,
    #[serde(flatten)]
    pub run: RunRow,
}

pub struct FleetHistory {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

impl FleetHistory {
    pub fn new(cfg: &aws_config::SdkConfig, calls: &CountCalls, table: &str) -> Self {
        let conf = aws_sdk_dynamodb::config::Builder::from(cfg)
            .interceptor(calls.clone())
            .build();
        FleetHistory {
            client: aws_sdk_dynamodb::Client::from_conf(conf),
            table: table.to_string(),
        }
    }

    /// The item for one record.
    fn item(rec: &FleetRecord) -> HashMap<String, AttributeValue> {
        let run = &rec.run;
        let text = |k: &str| run[k].as_str().map(str::to_string);
        let mut item = HashMap::new();
        let started = text("started_at").unwrap_or_default();
        let run_id = run["run_id"].as_i64().unwrap_or(0);
        item.insert(
            "instance_id".into(),
            s(&text("instance_id").unwrap_or_default()),
        );
        item.insert(
            "run".into(),
            s(&format!("{started}#{}#{run_id}", rec.writer)),
        );
        item.insert("run_id".into(), AttributeValue::N(run_id.to_string()));
        for k in [
            "group",
            "hook",
            "transition",
            "layer",
            "outcome",
            "hook_result",
            "decision",
            "cause",
            "error",
            "host",
            "region",
            "started_at",
            "finished_at",
        ] {
            if let Some(v) = text(k).filter(|v| !v.is_empty()) {
                item.insert(k.into(), s(&tail(&v, 1000)));
            }
        }
        if let Some(a) = &rec.account_id {
            item.insert("account_id".into(), s(a));
        }
        let steps: Vec<serde_json::Value> = run["steps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|st| {
                        serde_json::json!({
                            "kind": st["kind"],
                            "description": tail(st["description"].as_str().unwrap_or(""), 200),
                            "outcome": st["outcome"],
                            "detail": tail(st["detail"].as_str().unwrap_or(""), DETAIL_MAX),
                            "duration_ms": st["duration_ms"],
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        item.insert(
            "steps".into(),
            s(&serde_json::Value::from(steps).to_string()),
        );
        item.insert(
            "heartbeats".into(),
            AttributeValue::N(run["heartbeats"].as_u64().unwrap_or(0).to_string()),
        );
        item.insert(
            "expires_at".into(),
            AttributeValue::N((now_ms() / 1000 + KEEP.as_secs() as i64).to_string()),
        );
        item
    }

    /// Writes up to 25 records in one BatchWriteItem; what DynamoDB leaves unprocessed is
    /// a transient failure of those records.
    pub async fn put_batch(
        &self,
        records: &[String],
    ) -> Result<Vec<Result<(), AwsError>>, AwsError> {
        let op = "dynamodb:BatchWriteItem";
        let mut requests = Vec::new();
        for r in records {
            let rec: FleetRecord = serde_json::from_str(r)
                .map_err(|e| AwsError::permanent(op, format!("not a fleet record: {e}")))?;
            let put = PutRequest::builder()
                .set_item(Some(Self::item(&rec)))
                .build()
                .map_err(|e| AwsError::permanent(op, e.to_string()))?;
            requests.push(WriteRequest::builder().put_request(put).build());
        }
        let out = self
            .client
            .batch_write_item()
            .request_items(&self.table, requests)
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        let left = out
            .unprocessed_items()
            .and_then(|m| m.get(&self.table))
            .map_or(0, Vec::len);
        if left > 0 {
            return Err(AwsError {
                operation: op,
                code: None,
                message: format!("{left} of {} items unprocessed", records.len()),
                class: super::ErrorClass::Throttled,
            });
        }
        Ok(records.iter().map(|_| Ok(())).collect())
    }

    /// The newest `limit` runs that pass `filter`: one instance's by Query, else a Scan.
    pub async fn runs(
        &self,
        filter: &HistoryFilter,
        limit: usize,
    ) -> Result<Vec<FleetRun>, AwsError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let (items, next) = match &filter.instance {
                Some(id) => {
                    let r = self
                        .client
                        .query()
                        .table_name(&self.table)
                        .key_condition_expression("instance_id = :i")
                        .expression_attribute_values(":i", s(id))
                        .scan_index_forward(false)
                        .set_exclusive_start_key(start.take())
                        .send()
                        .await
                        .map_err(|e| classify("dynamodb:Query", e))?;
                    (r.items().to_vec(), r.last_evaluated_key().cloned())
                }
                None => {
                    let r = self
                        .client
                        .scan()
                        .table_name(&self.table)
                        .set_exclusive_start_key(start.take())
                        .send()
                        .await
                        .map_err(|e| classify("dynamodb:Scan", e))?;
                    (r.items().to_vec(), r.last_evaluated_key().cloned())
                }
            };
            out.extend(items.iter().map(read_item).filter(|r| passes(r, filter)));
            if filter.instance.is_some() && out.len() >= limit {
                break;
            }
            match next {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.run.received_at));
        out.truncate(limit);
        Ok(out)
    }
}

fn passes(r: &FleetRun, f: &HistoryFilter) -> bool {
    let eq =
        |want: &Option<String>, got: Option<&str>| want.as_deref().is_none_or(|w| Some(w) == got);
    eq(&f.instance, r.run.instance_id.as_deref())
        && eq(&f.group, r.run.group.as_deref())
        && eq(&f.account, r.run.account.as_deref())
        && eq(&f.region, r.run.region.as_deref())
        && f.outcome.is_none_or(|o| o == r.run.outcome)
}

fn read_item(item: &HashMap<String, AttributeValue>) -> FleetRun {
    let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
    let number = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse::<i64>().ok())
    };
    let ms = |k: &str| {
        text(k)
            .and_then(|t| humantime::parse_rfc3339_weak(&t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64)
    };
    #[derive(Deserialize)]
    struct Step {
        kind: Option<String>,
        description: Option<String>,
        outcome: Option<String>,
        detail: Option<String>,
        duration_ms: Option<i64>,
    }
    let steps: Vec<Step> = text("steps")
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    FleetRun {
        host: text("host").unwrap_or_default(),
        run: RunRow {
            id: number("run_id").unwrap_or(0),
            message_id: None,
            received_at: ms("started_at").unwrap_or(0),
            finished_at: ms("finished_at"),
            instance_id: text("instance_id"),
            group: text("group"),
            hook: text("hook"),
            transition: text("transition"),
            layer: text("layer"),
            account: text("account_id"),
            region: text("region"),
            outcome: text("outcome")
                .and_then(|o| Outcome::parse(&o))
                .unwrap_or_default(),
            hook_result: text("hook_result").and_then(|c| Completion::parse(&c)),
            decision: text("decision").and_then(|d| HookResult::parse(&d)),
            cause: text("cause"),
            heartbeats: number("heartbeats").unwrap_or(0),
            error: text("error"),
            steps: steps
                .into_iter()
                .enumerate()
                .map(|(i, st)| StepRow {
                    idx: i as i64,
                    kind: st.kind.unwrap_or_default(),
                    description: st.description.unwrap_or_default(),
                    started_at: 0,
                    finished_at: st.duration_ms,
                    outcome: st.outcome.unwrap_or_default(),
                    detail: st.detail.filter(|d| !d.is_empty()),
                })
                .collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run as the pipeline hands it over, in `account` and `region`.
    fn record(account: &str, region: &str) -> FleetRecord {
        FleetRecord {
            writer: "host-a-1".into(),
            account_id: Some(account.into()),
            run: serde_json::json!({
                "run_id": 7, "instance_id": "i-0123456789abcdef0", "group": "web-eu",
                "outcome": "succeeded", "region": region, "host": "host-a",
                "started_at": "2026-01-02T03:04:05Z", "steps": [],
            }),
        }
    }

    #[test]
    fn a_runs_account_and_region_are_read_back_and_filtered_by() {
        let eu = read_item(&FleetHistory::item(&record("210987654321", "eu-west-1")));
        assert_eq!(
            (eu.run.account.as_deref(), eu.run.region.as_deref()),
            (Some("210987654321"), Some("eu-west-1"))
        );
        let filter = |account: Option<&str>, region: Option<&str>| HistoryFilter {
            account: account.map(str::to_string),
            region: region.map(str::to_string),
            ..HistoryFilter::default()
        };
        assert!(passes(&eu, &filter(None, Some("eu-west-1"))));
        assert!(!passes(&eu, &filter(None, Some("us-east-1"))));
        assert!(passes(
            &eu,
            &filter(Some("210987654321"), Some("eu-west-1"))
        ));
        assert!(!passes(&eu, &filter(Some("123456789012"), None)));
    }
}

//! The `ecs_drain` step: drain the instance's ECS container instance before it goes.
//!
//! `{ ecs_drain = { cluster = "web-{metadata.environment}" }, timeout = "20m" }` (or
//! `{ ecs_drain = "web" }`): finds the instance's container instance in the cluster
//! (ListContainerInstances, filter `ec2InstanceId == ID`), sets it `DRAINING`
//! (UpdateContainerInstancesState), so that services start their tasks elsewhere and stop
//! them here, then waits until no task runs on it (DescribeContainerInstances every `poll`).
//! The hook is heartbeated meanwhile by the pipeline's lease. When tasks are still running at
//! the step's timeout, it fails saying how many. An instance not registered in the cluster
//! has nothing to drain. Safe to repeat: draining a DRAINING instance is a no-op. What the
//! tasks are and where they go is ECS's business (standalone tasks are not moved by ECS and
//! keep the step waiting until its timeout).

use std::ops::ControlFlow;
use std::time::Duration;

use tokio::time::Instant;

use crate::aws::{ContainerInstance, ContainerInstanceStatus};
use crate::poll::{until, Pace};
use crate::retry::with_backoff;
use crate::setting::ConfigError;
use crate::template::{Context, Template};

use super::{StepContext, StepError, StepOutput};

/// How long draining may take when the step sets no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
const DEFAULT_POLL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct EcsDrain {
    cluster: Template,
    poll: Duration,
    /// How long to wait for the tasks to leave (the step's `timeout`).
    pub timeout: Duration,
}

impl EcsDrain {
    pub fn parse(value: &toml::Value, key: &str) -> Result<EcsDrain, Vec<ConfigError>> {
        let (cluster, poll) = match value {
            toml::Value::String(c) => (Some(c.as_str()), None),
            toml::Value::Table(t) => {
                let unknown: Vec<ConfigError> = t
                    .keys()
                    .filter(|k| !matches!(k.as_str(), "cluster" | "poll"))
                    .map(|k| {
                        ConfigError::new(
                            format!("{key}.{k}"),
                            "unknown key; expected cluster or poll",
                        )
                    })
                    .collect();
                if !unknown.is_empty() {
                    return Err(unknown);
                }
                (t.get("cluster").and_then(|v| v.as_str()), t.get("poll"))
            }
            _ => (None, None),
        };
        let Some(cluster) = cluster else {
            return Err(vec![ConfigError::new(
                key,
                "must name the cluster: ecs_drain = \"NAME\" or { cluster = \"NAME\", poll = \"10s\" }",
            )]);
        };
        let cluster = Template::parse(cluster)
            .map_err(|e| vec![ConfigError::new(format!("{key}.cluster"), e.to_string())])?;
        let poll = match poll {
            None => DEFAULT_POLL,
            Some(v) => match v.as_str().map(crate::setting::parse_duration) {
                Some(Ok(d)) if !d.is_zero() => d,
                _ => {
                    return Err(vec![ConfigError::new(
                        format!("{key}.poll"),
                        "must be a duration such as \"10s\"",
                    )])
                }
            },
        };
        Ok(EcsDrain {
            cluster,
            poll,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    pub fn describe(&self) -> String {
        format!("ecs_drain cluster {}", self.cluster)
    }

    /// The cluster for one event: an ECS cluster name (letters, digits, '-', '_'; at most
    /// 255) or a cluster ARN.
    pub fn cluster(&self, ctx: &Context<'_>) -> Result<String, StepError> {
        let c = self
            .cluster
            .render(ctx)
            .map_err(|e| StepError::Input(e.to_string()))?;
        let name_ok = |n: &str| {
            (1..=255).contains(&n.len())
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let ok = match c.strip_prefix("arn:") {
            Some(_) => c.contains(":ecs:") && c.rsplit('/').next().is_some_and(name_ok),
            None => name_ok(&c),
        };
        if ok {
            Ok(c)
        } else {
            Err(StepError::Input(format!(
                "{:?} is not an ECS cluster name (letters, digits, '-' and '_', at most 255) or cluster ARN",
                c.chars().take(80).collect::<String>()
            )))
        }
    }

    pub fn preview(&self, ctx: &Context<'_>) -> Result<String, StepError> {
        Ok(format!(
            "ecs_drain: set {}'s container instance in cluster {} DRAINING, wait up to {} for its tasks to leave",
            ctx.event.instance_id,
            self.cluster(ctx)?,
            humantime::format_duration(self.timeout)
        ))
    }

    pub async fn run(&self, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let cluster = self.cluster(&ctx.template)?;
        let ecs = ctx.services.ecs.as_ref();
        let id = &ctx.template.event.instance_id;
        let found = with_backoff(ctx.retry_for, || ecs.container_instance(&cluster, id)).await?;
        let Some(ci) = found else {
            return Ok(StepOutput {
                detail: format!(
                    "{id} is not a container instance of cluster {cluster}: nothing to drain"
                ),
            });
        };
        if ci.status != ContainerInstanceStatus::Draining {
            with_backoff(ctx.retry_for, || ecs.drain(&cluster, &ci.arn)).await?;
        }
        let started = Instant::now();
        let left = self.wait_until_empty(ctx, &cluster, &ci).await?;
        match left {
            Ok(()) => Ok(StepOutput {
                detail: format!(
                    "drained container instance {} of cluster {cluster}: {} task(s) were running, none is now (waited {})",
                    ci.arn,
                    ci.running_tasks,
                    humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()))
                ),
            }),
            Err(running) => Err(StepError::Remote(format!(
                "{running} task(s) still running on container instance {} of cluster {cluster} after {} (the step's timeout); they did not move off",
                ci.arn,
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// Polls the container instance until it runs no task. Inner `Err`: how many still ran
    /// at the deadline.
    async fn wait_until_empty(
        &self,
        ctx: &StepContext<'_>,
        cluster: &str,
        ci: &ContainerInstance,
    ) -> Result<Result<(), i32>, StepError> {
        let ecs = ctx.services.ecs.as_ref();
        let pace = Pace::doubling(Instant::now() + self.timeout, self.poll, self.poll);
        let done = until(pace, || async {
            let now = with_backoff(ctx.retry_for, || {
                ecs.describe_container_instance(cluster, &ci.arn)
            })
            .await;
            match now {
                Ok(Some(c)) if c.running_tasks > 0 => {
                    ctx.note(format!(
                        "waiting for {} task(s) to leave container instance {}",
                        c.running_tasks, c.arn
                    ));
                    ControlFlow::Continue(c.running_tasks)
                }
                // No task left, or deregistered (nothing can run on it any more).
                Ok(_) => ControlFlow::Break(Ok(())),
                Err(e) => ControlFlow::Break(Err(StepError::Aws(e))),
            }
        })
        .await;
        match done {
            Ok(Ok(())) => Ok(Ok(())),
            Ok(Err(e)) => Err(e),
            Err(running) => Ok(Err(running)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EcsDrain, Vec<ConfigError>> {
        let v: toml::Value = toml::from_str(&format!("x = {text}")).unwrap();
        EcsDrain::parse(&v["x"], "layers.ecs.terminate[0].ecs_drain")
    }

    #[test]
    fn the_cluster_is_a_template_and_checked_when_rendered() {
        let d = parse(r#"{ cluster = "web-{metadata.env}", poll = "2s" }"#).unwrap();
        assert_eq!(d.poll, Duration::from_secs(2));
        let body = serde_json::json!({
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
            "AutoScalingGroupName": "g", "LifecycleHookName": "h",
            "EC2InstanceId": "i-0123456789abcdef0", "LifecycleActionToken": "t",
            "NotificationMetadata": "{\"env\":\"prod\",\"bad\":\"a b\"}",
        });
        let crate::event::Parsed::Event(ev) = crate::event::parse(&body.to_string()) else {
            panic!()
        };
        let vars = crate::template::Vars::default();
        let ctx = Context::new(&ev, "ecs", &vars);
        assert_eq!(d.cluster(&ctx).unwrap(), "web-prod");
        let bad = parse(r#""web-{metadata.bad}""#).unwrap();
        let err = bad.cluster(&ctx).unwrap_err().to_string();
        assert!(err.contains("not an ECS cluster name"), "{err}");
        let arn = parse(r#""arn:aws:ecs:us-east-1:123456789012:cluster/web""#).unwrap();
        assert!(arn.cluster(&ctx).is_ok());
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = parse("{ clustr = \"web\" }").unwrap_err();
        assert_eq!(e[0].key, "layers.ecs.terminate[0].ecs_drain.clustr");
        let e = parse("{ cluster = \"web\", poll = \"soon\" }").unwrap_err();
        assert_eq!(e[0].key, "layers.ecs.terminate[0].ecs_drain.poll");
        assert!(parse("3").is_err());
        assert!(parse("\"web-{nope}\"").is_err());
    }
}

//! The `opsworks` step: register the instance with an OpsWorks Stacks stack and assign it
//! to a layer, from the ops host, with nothing on the instance; deregister on terminate.
//!
//! ```toml
//! { opsworks = { stack = "v{metadata.major} {metadata.environment} {metadata.platform}", layer = "app", region = "us-east-1" } }
//! ```
//!
//! Launch: find the stack by name and the layer by shortname (cached), reuse an existing
//! registration of this EC2 instance or: GetHostnameSuggestion, tag `Name` (default
//! `"{stack} - {hostname}"`), RegisterInstance; wait until registered; AssignInstance
//! unless already assigned; wait until online. Every part is safe to repeat.
//! AWS ended OpsWorks Stacks on 26 May 2024: this step serves stacks that still answer
//! the API and migrations away from them.

use std::ops::ControlFlow;
use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

use crate::aws::{AwsError, InstanceInfo, OwInstance};
use crate::event::Transition;
use crate::poll::{until, Pace};
use crate::retry::{with_backoff, Backoff};
use crate::setting::{ConfigError, Fields};
use crate::template::{Template, Vars};

use super::{StepContext, StepError, StepOutput};

const DEFAULT_ONLINE_TIMEOUT: Duration = Duration::from_secs(1200);
const DEFAULT_NAME_TAG: &str = "{stack} - {hostname}";
/// Statuses from which an instance will not reach `online` by itself.
const DEAD_END: &[&str] = &[
    "setup_failed",
    "start_failed",
    "connection_lost",
    "terminated",
    "terminating",
    "stopped",
    "stop_failed",
    "shutting_down",
    "deregistering",
];

/// How the step finds its stack.
#[derive(Debug, Clone)]
enum StackRef {
    /// `stack`: by name, among every stack of the region (DescribeStacks without StackIds:
    /// the policy must allow it on `*`).
    Name(Template),
    /// `stack_id`: by id (DescribeStacks with StackIds: a policy scoped to stack ARNs
    /// allows it).
    Id(Template),
}

impl StackRef {
    fn template(&self) -> &Template {
        match self {
            StackRef::Name(t) | StackRef::Id(t) => t,
        }
    }
}

#[derive(Debug, Clone)]
pub struct OpsWorks {
    stack: StackRef,
    layer: String,
    region: Option<String>,
    name_tag: Option<Template>,
    online_timeout: Duration,
}

/// Terminate: deregisters the instance's registration with the stack, if it has one.
async fn deregister(
    ctx: &StepContext<'_>,
    region: &str,
    stack_name: &str,
    existing: Option<OwInstance>,
) -> Result<StepOutput, StepError> {
    let ec2_id = &ctx.template.event.instance_id;
    match existing {
        Some(i) => {
            with_backoff(ctx.retry_for, || {
                ctx.services.opsworks.deregister(region, &i.id)
            })
            .await?;
            Ok(StepOutput {
                detail: format!(
                    "deregistered {} ({}) from stack {stack_name:?}",
                    i.id,
                    i.hostname.unwrap_or_default()
                ),
            })
        }
        None => Ok(StepOutput {
            detail: format!(
                "{ec2_id} is not registered with stack {stack_name:?}; nothing to deregister"
            ),
        }),
    }
}

/// `name_tag`: the template of the `Name` tag (`{stack}`, `{hostname}`), or `"none"`.
fn name_tag(f: &mut Fields<'_>) -> Option<Template> {
    let v = match f.non_empty("name_tag") {
        None => DEFAULT_NAME_TAG,
        Some("none") => return None,
        Some(v) => v,
    };
    match Template::parse_with(v, &["stack", "hostname"]) {
        Ok(t) => Some(t),
        Err(e) => {
            f.error("name_tag", e.to_string());
            None
        }
    }
}

impl OpsWorks {
    pub fn parse(
        value: &toml::Value,
        key: &str,
        _vars: &Vars,
    ) -> Result<OpsWorks, Vec<ConfigError>> {
        let t = value.as_table().ok_or_else(|| {
            vec![ConfigError::new(
                key,
                "must be a table: { stack = \"...\", layer = \"...\" }",
            )]
        })?;
        let mut errs = Vec::new();
        let mut f = Fields::new(Some(t), key, &mut errs);
        let by_name = f.non_empty("stack").map(Template::parse);
        let by_id = f.non_empty("stack_id").map(Template::parse);
        let stack = match (by_name, by_id) {
            (Some(Ok(t)), None) => Some(StackRef::Name(t)),
            (None, Some(Ok(t))) => Some(StackRef::Id(t)),
            (Some(Err(e)), _) => {
                f.error("stack", e.to_string());
                None
            }
            (_, Some(Err(e))) => {
                f.error("stack_id", e.to_string());
                None
            }
            (Some(_), Some(_)) => {
                f.error(
                    "stack_id",
                    "give the stack by name (stack) or by id (stack_id), not both",
                );
                None
            }
            (None, None) => {
                f.error(
                    "stack",
                    "missing: the stack's name (a template), or stack_id",
                );
                None
            }
        };
        let layer = f.non_empty("layer").map(str::to_string).unwrap_or_else(|| {
            f.error("layer", "missing: the OpsWorks layer's shortname");
            String::new()
        });
        let name_tag = name_tag(&mut f);
        let online_timeout = f
            .timeout("online_timeout", "20m")
            .unwrap_or(DEFAULT_ONLINE_TIMEOUT);
        let region = f.non_empty("region").map(str::to_string);
        f.finish("unknown key for an opsworks step");
        match (stack, errs.is_empty()) {
            (Some(stack), true) => Ok(OpsWorks {
                stack,
                layer,
                region,
                name_tag,
                online_timeout,
            }),
            _ => Err(errs),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "opsworks stack {:?} layer {:?}{}",
            self.stack.template().source(),
            self.layer,
            self.region
                .as_deref()
                .map(|r| format!(" in {r}"))
                .unwrap_or_default()
        )
    }

    pub fn preview(&self, ctx: &crate::template::Context<'_>) -> Result<String, StepError> {
        let stack = self
            .stack
            .template()
            .render(ctx)
            .map_err(|e| StepError::Input(e.to_string()))?;
        Ok(format!(
            "opsworks stack {stack:?} layer {:?} in {}",
            self.layer,
            self.region()
        ))
    }

    fn region(&self) -> String {
        self.region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_string())
    }

    /// The stack, by name (every stack of the region listed once, cached) or by id.
    async fn find_stack(
        &self,
        ctx: &StepContext<'_>,
        region: &str,
    ) -> Result<crate::aws::OwStack, StepError> {
        let ow = ctx.services.opsworks.clone();
        let retry = ctx.retry_for;
        let wanted = self
            .stack
            .template()
            .render(&ctx.template)
            .map_err(|e| StepError::Input(e.to_string()))?;
        match &self.stack {
            StackRef::Name(_) => {
                let stacks = ctx
                    .shared
                    .ow_stacks
                    .get_or_load(&region.to_string(), || {
                        with_backoff(retry, || ow.stacks(region))
                    })
                    .await?;
                stacks
                    .iter()
                    .find(|s| s.name == wanted)
                    .cloned()
                    .ok_or_else(|| {
                        StepError::Input(format!("no OpsWorks stack named {wanted:?} in {region}"))
                    })
            }
            StackRef::Id(_) => with_backoff(retry, || ow.stack(region, &wanted))
                .await?
                .ok_or_else(|| {
                    StepError::Input(format!("no OpsWorks stack with id {wanted:?} in {region}"))
                }),
        }
    }

    pub async fn run(&self, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let region = self.region();
        let ow = ctx.services.opsworks.clone();
        let retry = ctx.retry_for;
        let ec2_id = ctx.template.event.instance_id.clone();
        let stack = self.find_stack(ctx, &region).await?;
        let stack_name = stack.name.clone();
        let existing = with_backoff(retry, || ow.instances(&region, &stack.id))
            .await?
            .into_iter()
            .find(|i| i.ec2_instance_id.as_deref() == Some(ec2_id.as_str()));

        if ctx.template.event.transition == Transition::Terminate {
            return deregister(ctx, &region, &stack_name, existing).await;
        }

        let layers = ctx
            .shared
            .ow_layers
            .get_or_load(&(region.clone(), stack.id.clone()), || {
                with_backoff(retry, || ow.layers(&region, &stack.id))
            })
            .await?;
        let layer = layers
            .iter()
            .find(|l| l.shortname == self.layer)
            .ok_or_else(|| {
                StepError::Input(format!(
                    "stack {stack_name:?} has no layer with shortname {:?}",
                    self.layer
                ))
            })?;

        let deadline = Instant::now() + self.online_timeout;
        let registered = match existing {
            Some(i) => {
                info!(opsworks_id = %i.id, "instance already registered with the stack; reusing it");
                i
            }
            None => {
                let stack = (stack_name.as_str(), stack.id.as_str());
                self.register(ctx, &region, stack, &layer.id, deadline)
                    .await?
            }
        };
        if !registered.layer_ids.contains(&layer.id) {
            with_backoff(retry, || ow.assign(&region, &registered.id, &layer.id)).await?;
            info!(layer = %self.layer, "assigned to the layer");
        }
        let online = self
            .wait_for(ctx, &region, &registered.id, deadline, |s| s == "online")
            .await?;
        Ok(StepOutput {
            detail: format!(
                "{} ({}) online in stack {stack_name:?}, layer {}",
                online.id,
                online.hostname.unwrap_or_default(),
                self.layer
            ),
        })
    }

    /// Registers the EC2 instance with the stack (`(name, id)`) under a suggested hostname,
    /// tagging it `Name` first, and waits until OpsWorks has registered it.
    async fn register(
        &self,
        ctx: &StepContext<'_>,
        region: &str,
        (stack_name, stack_id): (&str, &str),
        layer_id: &str,
        deadline: Instant,
    ) -> Result<OwInstance, StepError> {
        let (ow, retry) = (&ctx.services.opsworks, ctx.retry_for);
        let ec2_id = &ctx.template.event.instance_id;
        let hostname = with_backoff(retry, || ow.hostname_suggestion(region, layer_id)).await?;
        if let Some(t) = &self.name_tag {
            let extra = [("stack", stack_name), ("hostname", hostname.as_str())];
            let name = t
                .render(&ctx.template.with_extra(&extra))
                .map_err(|e| StepError::Input(e.to_string()))?;
            let tags = [("Name".to_string(), name)];
            with_backoff(retry, || ctx.services.instances.create_tags(ec2_id, &tags)).await?;
        }
        let info: InstanceInfo = ctx
            .shared
            .lookup
            .submit(ec2_id.clone())
            .await
            .map_err(|e| StepError::Remote(e.to_string()))?;
        let id = with_backoff(retry, || ow.register(region, stack_id, &hostname, &info)).await?;
        info!(opsworks_id = %id, %hostname, "registered with the stack");
        self.wait_for(ctx, region, &id, deadline, |s| {
            s != "registering" && s != "requested"
        })
        .await
    }

    /// Polls the registration with backoff until `done(status)` or the deadline; fails
    /// early on a status that cannot lead there.
    async fn wait_for(
        &self,
        ctx: &StepContext<'_>,
        region: &str,
        id: &str,
        deadline: Instant,
        done: impl Fn(&str) -> bool,
    ) -> Result<OwInstance, StepError> {
        // Jittered, so registrations started together do not poll in step.
        let backoff = Backoff::doubling(Duration::from_secs(2), Duration::from_secs(15));
        let pace = Pace::new(
            deadline,
            backoff.full_jitter().at_least(Duration::from_millis(500)),
        );
        let done = &done;
        let found = until(pace, move || async move {
            let r: Result<Option<OwInstance>, AwsError> =
                with_backoff(ctx.retry_for, || ctx.services.opsworks.instance(region, id)).await;
            match r {
                Err(e) => ControlFlow::Break(Err(StepError::Aws(e))),
                Ok(Some(i)) if done(&i.status) => ControlFlow::Break(Ok(i)),
                Ok(Some(i)) if DEAD_END.contains(&i.status.as_str()) => ControlFlow::Break(Err(
                    StepError::Remote(format!("OpsWorks instance {id} is {}", i.status)),
                )),
                Ok(Some(i)) => ControlFlow::Continue(i.status),
                Ok(None) => ControlFlow::Break(Err(StepError::Remote(format!(
                    "OpsWorks instance {id} disappeared"
                )))),
            }
        })
        .await;
        found.unwrap_or_else(|status| {
            Err(StepError::NotReady(format!(
                "OpsWorks instance {id} still {status} after {}",
                humantime::format_duration(self.online_timeout)
            )))
        })
    }
}

//! EC2's warnings about an instance: a Spot interruption (the instance goes two minutes
//! after the warning, whatever its terminate hook says) and a rebalance recommendation.
//!
//! For an instance of a group some layer matches: the deadline of a Spot interruption is
//! recorded in the claim store, shared by the fleet (a claim of [`deadline_key`] whose lease
//! ends at the deadline, so it lapses with the instance, its owner naming the deadline), a `provision.interruption` event is
//! published, and the layer's `interrupt` steps run at once (nothing to complete). When the
//! terminate hook's message comes, its run finds the deadline (`steps.rs`): every step's
//! timeout is cut to what is left, and templates read `{deadline}`. A rebalance
//! recommendation is recorded and published only: the group's Capacity Rebalancing does the
//! rest. A warning for an instance no layer manages is recorded as unmatched, like any
//! unmatched event.

use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use super::{Finish, Job, Pipeline, Trust};
use crate::aws::autoscaling::HookTransition;
use crate::clock::{now_ms, rfc3339};
use crate::delivery::Delivery;
use crate::event::{
    Envelope, Interruption, InterruptionKind, LifecycleEvent, Metadata, Place, Transition,
};
use crate::outcome::Outcome;
use crate::retry::with_backoff;

/// The claim-store key holding an instance's Spot interruption deadline.
pub fn deadline_key(instance: &crate::event::InstanceId) -> String {
    format!("spot-deadline:{instance}")
}

/// The owner a deadline's claim is written under, the deadline (ms) after the `@`: the
/// lease, counted from the writer's clock, ends there only to a few milliseconds.
const DEADLINE_OWNER: &str = "spot-interruption@";

impl Pipeline {
    /// One EC2 warning, from a message.
    pub(super) async fn interruption(
        &self,
        delivery: &Delivery,
        i: Interruption,
        cancel: &CancellationToken,
    ) -> Outcome {
        let msg = &delivery.message;
        let span = info_span!("interruption", message_id = %msg.id,
            instance_id = %i.instance_id, kind = i.kind.as_str());
        async {
            let event = match self.interrupted_event(&i).await {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    let why = format!("{} for {}: the instance is in no group a layer matches", i.kind.as_str(), i.instance_id);
                    info!(%why, "unmatched interruption");
                    return self.record_unworked(msg, Outcome::Unmatched, &why).await;
                }
                Err(e) => {
                    warn!(error = %e, "cannot look up the interrupted instance; the message will come back");
                    return Outcome::Retry;
                }
            };
            let layer = self.route(&event).map(|l| l.name.clone());
            let Some(layer) = layer else {
                let why = format!("no layer matches group {}", event.group);
                return self.record_unworked(msg, Outcome::Unmatched, &why).await;
            };
            self.record_deadline(&i).await;
            self.publish(interruption_event(&i, &event.group, &layer)).await;
            let interrupt_steps = self
                .cfg
                .layers
                .iter()
                .find(|l| l.name == layer)
                .is_some_and(|l| !l.interrupt.is_empty());
            if i.kind != InterruptionKind::SpotInterruption || !interrupt_steps {
                let what = format!("{} recorded and published (layer {layer})", i.kind.as_str());
                return self.record_unworked(msg, Outcome::Skipped, &what).await;
            }
            warn!(layer, deadline = %rfc3339(i.deadline_ms.unwrap_or_default()),
                "Spot interruption: running the layer's interrupt steps now");
            let job = Job {
                message_id: Some(msg.id.clone()),
                interrupt: true,
                ..interrupt_job(event)
            };
            self.run(job, delivery.lease(), cancel).await.outcome
        }
        .instrument(span)
        .await
    }

    /// The event a terminate of the instance would carry (its group, its terminate hook's
    /// metadata), or None when it is in no group.
    async fn interrupted_event(
        &self,
        i: &Interruption,
    ) -> Result<Option<LifecycleEvent>, crate::aws::AwsError> {
        let retry = self.cfg.aws.retry_for;
        let hooks = self.hooks.clone();
        let Some(m) = with_backoff(retry, || hooks.membership(&i.instance_id)).await? else {
            return Ok(None);
        };
        let described = with_backoff(retry, || hooks.describe_hooks(&m.group)).await?;
        let hook = described
            .into_iter()
            .find(|(_, h)| h.transition == HookTransition::Terminating);
        Ok(Some(LifecycleEvent {
            instance_id: i.instance_id.clone(),
            group: m.group,
            hook: hook.as_ref().map_or("-".into(), |(n, _)| n.clone()),
            transition: Transition::Terminate,
            token: format!("interruption-{}-{}", i.instance_id, now_ms()),
            origin: Some(Place::AutoScalingGroup),
            destination: Some(Place::Ec2),
            metadata: Metadata::parse(
                hook.as_ref()
                    .and_then(|(_, h)| h.notification_metadata.as_deref()),
            ),
            account_id: None,
            time: Some(i.time.clone()),
            envelope: Envelope::EventBridge,
        }))
    }

    /// Keeps a Spot interruption's deadline in the claim store until it passes.
    async fn record_deadline(&self, i: &Interruption) {
        let Some(deadline) = i.deadline_ms else {
            return;
        };
        let left = Duration::from_millis((deadline - now_ms()).max(1000) as u64);
        let key = deadline_key(&i.instance_id);
        let owner = format!("{DEADLINE_OWNER}{deadline}");
        if let Err(e) = self.claims.claim(&key, &owner, 0, left).await {
            warn!(error = %e, "could not record the interruption's deadline; the terminate steps will not be cut to it");
        }
    }

    /// The Spot interruption deadline recorded for an instance, while it has not passed.
    pub(super) async fn deadline_of(&self, instance: &crate::event::InstanceId) -> Option<i64> {
        match self.claims.peek(&deadline_key(instance), &self.owner).await {
            Ok(crate::claims::Claim::Held { owner, .. }) => owner
                .strip_prefix(DEADLINE_OWNER)
                .and_then(|ms| ms.parse().ok()),
            _ => None,
        }
    }
}

/// The job that runs an interrupted instance's `interrupt` steps: nothing to complete.
fn interrupt_job(event: LifecycleEvent) -> Job {
    Job {
        event,
        message_id: None,
        layer: None,
        action: None,
        finish: Finish::Leave,
        progress: None,
        // Read from Auto Scaling just now.
        trust: Trust::FromAutoScaling,
        instance_gone: false,
        interrupt: true,
    }
}

/// The `provision.interruption` event for the result topic.
fn interruption_event(i: &Interruption, group: &str, layer: &str) -> String {
    json!({
        "type": "provision.interruption",
        "kind": i.kind.as_str(),
        "instance_id": i.instance_id.as_str(),
        "group": group,
        "layer": layer,
        "time": i.time,
        "deadline": i.deadline_ms.map(rfc3339),
        "host": crate::claims::hostname(),
    })
    .to_string()
}

"""moto server (5.2.x) plus Auto Scaling lifecycle hooks, call counters and fault injection.

Usage (same CLI as moto_server):

    .venv/bin/python tests/emulator/emulator.py -H 127.0.0.1 -p PORT
    .venv/bin/python tests/emulator/emulator.py -H 127.0.0.1 -p 0 --port-file FILE

With `-p 0` the kernel picks a free port, written to FILE once the server listens: nothing
can take the port between choosing and binding it.

What it adds on top of moto:

* PutLifecycleHook keeps NotificationTargetARN / RoleARN / NotificationMetadata /
  HeartbeatTimeout (default 3600, values below AWS's 30 s minimum are accepted) /
  DefaultResult (default ABANDON), merges updates into an existing hook like AWS, and sends
  the autoscaling:TEST_NOTIFICATION message to the target. CreateAutoScalingGroup accepts
  LifecycleHookSpecificationList.
* Launch hooks: new instances wait in Pending:Wait; one lifecycle action (fresh token) per
  (instance, hook); the message goes to the hook's SQS queue (raw JSON) or SNS topic
  (published, so subscribed queues get the SNS envelope) and, for every lifecycle action,
  to the region's default EventBridge bus (source aws.autoscaling).
* Terminate hooks: scale-in and TerminateInstanceInAutoScalingGroup put the instance in
  Terminating:Wait; it is terminated and removed only when all its terminate actions are
  finished; then the group reconciles its capacity (replacement when the desired capacity
  was not decremented).
* CompleteLifecycleAction / RecordLifecycleActionHeartbeat with AWS-style validation.
* A daemon thread applies DefaultResult on heartbeat timeout and on the global timeout
  (min(100 x HeartbeatTimeout, 172800 s)), and so does every heartbeat and completion
  before it looks the action up (an action past its timeout is over, swept or not), all
  read from Auto Scaling's clock: the wall
  clock plus whatever POST /_emulator/clock {"advance_seconds": N} added (it never goes
  back; the timeouts that passed are applied before it answers). Lifecycle messages carry
  that clock's time, as AWS's carry the time the action started.
* Control endpoints (JSON): GET /_emulator/lifecycle, GET /_emulator/calls,
  POST /_emulator/calls/reset, GET|POST|DELETE /_emulator/faults (FAULT_KINDS: throttling,
  500 with and without an error code, ResourceContention, 503 HTML, connection reset, HTTP
  429 and 408, no answer at all (`hang`), delays; per service, operation and count), GET|POST /_emulator/clock, GET /_emulator/health
  (answers the serving process's pid, so a client can tell its own child answered),
  GET|POST /_emulator/spot (EC2 Spot interruption warnings and rebalance recommendations
  through EventBridge, source aws.ec2; an interrupted instance is terminated through its
  group's terminate hooks at once and by EC2 at the deadline).
  POST /moto-api/reset also clears the lifecycle actions, the counters and the faults.
* Extensions, in modules next to this file (requests are routed to them after call counting
  and fault injection; their control endpoints live under /_emulator/<name>; POST
  /moto-api/reset resets them too):
  - ssm_agent.py: SSM Run Command with simulated agents that run AWS-RunShellScript for real
    (DescribeInstanceInformation, SendCommand, ListCommands, ListCommandInvocations,
    GetCommandInvocation, CancelCommand; /_emulator/ssm).
  - opsworks.py: OpsWorks Stacks in memory (stacks, layers, registered instances;
    /_emulator/opsworks).
  - console.py: EC2 GetConsoleOutput with cloud-init's SSH host key blocks for instances whose
    host keys a test registered (/_emulator/console).
  - ecs.py: ECS container instance draining (service tasks move to ACTIVE instances, one a
    second) and ListContainerInstances' `ec2InstanceId == ...` filter (/_emulator/ecs).
* Warm pools (PutWarmPool / DescribeWarmPool): instances entering the pool wait in
  Warmed:Pending:Wait for the launch hooks, then stop (Warmed:Stopped); a scale-out takes them
  first (Pending:Wait, Origin WarmPool); scale-in with ReuseOnScaleIn returns instances to it;
  TerminateInstanceInAutoScalingGroup on a pool instance: Warmed:Terminating:Wait. Pool
  instances are listed by DescribeAutoScalingInstances, not by DescribeAutoScalingGroups.
* GET /_emulator/calls also answers "by_app": {"<name>": {"service:Action": n}}, counting the
  requests whose User-Agent or X-Amz-User-Agent names the SDK app `app/<name>`.

Output is moto_server's (werkzeug banner + one access-log line per request on stderr); set
EMULATOR_QUIET=1 to drop the access log (handy when stderr is piped and not drained).

Apart from its extension modules it only needs the moto[server] package.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the extension modules
sys.dont_write_bytecode = True  # no __pycache__ in the work tree

import console  # noqa: E402
import ecs  # noqa: E402
import opsworks  # noqa: E402
import ssm_agent  # noqa: E402
import sts  # noqa: E402
from moto.autoscaling import models as M
from moto.autoscaling import responses as R
from moto.autoscaling.exceptions import AutoscalingClientError, ValidationError
from moto.core.responses import EmptyResult

LAUNCH = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATE = "autoscaling:EC2_INSTANCE_TERMINATING"
TRANSITIONS = (LAUNCH, TERMINATE)
RESULTS = ("CONTINUE", "ABANDON")
MAX_GLOBAL_TIMEOUT = 172800
TICK_SECONDS = 0.2

# One re-entrant lock protects the lifecycle state and the moto backends it touches. The WSGI
# wrapper holds it for every request except SQS ones (SQS long polling would block everyone).
LOCK = threading.RLock()

# token -> action dict. Keys starting with "_" are private and not shown by /_emulator/lifecycle.
ACTIONS: dict[str, dict[str, Any]] = {}
CALLS: Counter = Counter()
# SDK app name (the `app/<name>` of the user agent) -> Counter like CALLS
CALLS_BY_APP: dict[str, Counter] = {}
FAULTS: list[dict[str, Any]] = []
# How long a launching instance stays `Pending` in the Describe* answers after its launch
# action began and was notified (POST /_emulator/lag {"describe_seconds": N}). AWS's
# descriptions are eventually consistent: the notification can arrive before
# DescribeAutoScalingGroups shows `Pending:Wait`. 0: no lag.
DESCRIBE_LAG = {"seconds": 0.0}
# Modules that answer some AWS requests themselves: dispatch(environ, body), control(method,
# path, body) and reset().
EXTENSIONS = (ssm_agent, opsworks, console, ecs, sts)
ssm_agent.BACKEND_LOCK = LOCK
ecs.BACKEND_LOCK = LOCK
PUBLIC_ACTION_KEYS = (
    "token", "group", "hook", "instance_id", "transition", "state", "result",
    "finished_by", "heartbeats", "completions", "created", "finished",
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


# Auto Scaling's clock: the wall clock plus what the tests advanced it by (POST
# /_emulator/clock). Hook heartbeat timeouts, global timeouts and the times in lifecycle
# messages are read from it, so a test can let an action age without sleeping.
CLOCK_OFFSET = 0.0


def _now() -> float:
    return time.time() + CLOCK_OFFSET


def _aws_time() -> str:
    now = datetime.datetime.fromtimestamp(_now(), datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _hooks(backend: Any, group_name: str, transition: str | None = None) -> list[Any]:
    return [
        h for h in backend.lifecycle_hooks.values()
        if h.auto_scaling_group_name == group_name
        and (transition is None or h.lifecycle_transition == transition)
    ]


def _deliver(arn: str | None, message: dict[str, Any], subject: str) -> None:
    """Send a lifecycle message to an SQS queue (raw JSON) or an SNS topic (published)."""
    if not arn:
        return
    parts = arn.split(":")
    if len(parts) < 6 or parts[0] != "arn":
        raise ValueError(f"not an ARN: {arn}")
    service, region, account, resource = parts[2], parts[3], parts[4], ":".join(parts[5:])
    body = _json(message)
    if service == "sqs":
        from moto.sqs.models import sqs_backends

        sqs_backends[account][region].send_message(resource, body)
    elif service == "sns":
        from moto.sns.models import sns_backends

        sns_backends[account][region].publish(body, arn=arn, subject=subject[:100])
    else:
        raise ValueError(f"unsupported notification target: {arn}")


def _deliver_quietly(arn: str | None, message: dict[str, Any], subject: str) -> None:
    try:
        _deliver(arn, message, subject)
    except Exception:  # a deleted queue/topic must not break the scaling activity
        pass


def _put_eventbridge(account: str, region: str, detail_type: str, resources: list[str],
                     detail: dict[str, Any], source: str = "aws.autoscaling",
                     at: float | None = None) -> None:
    """Put an event (aws.autoscaling unless told) on the region's default bus, shaped like
    AWS's; `at` is its time (Auto Scaling's clock unless told)."""
    try:
        from moto.events.models import events_backends

        bus = events_backends[account][region].event_buses.get("default")
        if bus is None:
            return
        event = {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": detail_type,
            "source": source,
            "account": account,
            # moto's targets turn this epoch into "YYYY-MM-DDTHH:MM:SSZ" like AWS
            "time": _now() if at is None else at,
            "region": region,
            "resources": resources,
            "detail": detail,
        }
        for rule in list(bus.rules.values()):
            if getattr(rule, "state", "ENABLED") == "DISABLED":
                continue
            try:
                if not rule.event_pattern.matches_event(event):
                    continue
            except Exception:
                continue
            for target in list(rule.targets):
                # moto's default input template drops "account" and reorders the keys, so a
                # target without an input transformer gets the event exactly as AWS sends it.
                single = copy.copy(rule)
                single.targets = [target]
                transform = any(k in target for k in ("InputTransformer", "Input", "InputPath"))
                payload = copy.deepcopy(event)
                if transform:
                    payload["ingestion-time"] = payload["time"]
                try:
                    single.send_to_targets(payload, transform_input=transform)
                except Exception:
                    pass
    except Exception:
        pass


def _test_notification(group: Any, hook: Any) -> tuple[dict[str, Any], str]:
    be = group.autoscaling_backend
    msg = {
        "AccountId": be.account_id,
        "RequestId": str(uuid.uuid4()),
        "AutoScalingGroupARN": group.arn,
        "AutoScalingGroupName": group.name,
        "Service": "AWS Auto Scaling",
        "Event": "autoscaling:TEST_NOTIFICATION",
        "Time": _aws_time(),
    }
    return msg, f'Auto Scaling: test notification for group "{group.name}"'


def _flush_test_notifications(group: Any) -> None:
    """Hooks created with CreateAutoScalingGroup send their test message before any launch."""
    for hook in _hooks(group.autoscaling_backend, group.name):
        if getattr(hook, "_emu_test_pending", False):
            hook._emu_test_pending = False
            msg, subject = _test_notification(group, hook)
            _deliver_quietly(getattr(hook, "notification_target_arn", None), msg, subject)


def _state_of(group: Any, instance_id: str) -> Any:
    for st in group.instance_states:
        if st.instance.id == instance_id:
            return st
    return None


def _pending_for(instance_id: str, transition: str | None = None) -> list[dict[str, Any]]:
    return [
        a for a in ACTIONS.values()
        if a["state"] == "pending" and a["instance_id"] == instance_id
        and (transition is None or a["transition"] == transition)
    ]


def _mark_finished(action: dict[str, Any], result: str, by: str) -> None:
    action["state"] = "finished"
    action["result"] = result
    action["finished_by"] = by
    action["finished"] = _now()


def _cancel_for_instance(instance_id: str, transition: str | None = None) -> None:
    """Finish pending actions of an instance that left the wait state for another reason."""
    for a in _pending_for(instance_id, transition):
        _mark_finished(a, "ABANDON", "cancelled")


# --------------------------------------------------------------------------------------------
# lifecycle actions
# --------------------------------------------------------------------------------------------


def _start_action(group: Any, state: Any, hook: Any,
                  places: tuple[str, str] | None = None) -> dict[str, Any]:
    """One lifecycle action; `places` is (Origin, Destination), the plain transition's when
    None (warm pools give others)."""
    be = group.autoscaling_backend
    now = _now()
    hb = int(getattr(hook, "heartbeat_timeout", 3600) or 3600)
    token = str(uuid.uuid4())
    transition = hook.lifecycle_transition
    action = {
        "token": token,
        "group": group.name,
        "hook": hook.name,
        "instance_id": state.instance.id,
        "transition": transition,
        "state": "pending",
        "result": None,
        "finished_by": None,
        "heartbeats": 0,
        "completions": 0,
        "created": now,
        "finished": None,
        "_account": be.account_id,
        "_region": be.region_name,
        "_heartbeat_timeout": hb,
        "_default_result": getattr(hook, "default_result", "ABANDON") or "ABANDON",
        "_deadline": now + hb,
        "_global_deadline": now + min(100 * hb, MAX_GLOBAL_TIMEOUT),
    }
    ACTIONS[token] = action

    launching = transition == LAUNCH
    origin, destination = places or (
        ("EC2", "AutoScalingGroup") if launching else ("AutoScalingGroup", "EC2")
    )
    metadata = getattr(hook, "notification_metadata", None)
    msg: dict[str, Any] = {
        "Origin": origin,
        "LifecycleHookName": hook.name,
        "Destination": destination,
        "AccountId": be.account_id,
        "RequestId": str(uuid.uuid4()),
        "LifecycleTransition": transition,
        "AutoScalingGroupName": group.name,
        "Service": "AWS Auto Scaling",
        "Time": _aws_time(),
        "EC2InstanceId": state.instance.id,
    }
    if metadata:
        msg["NotificationMetadata"] = metadata
    msg["LifecycleActionToken"] = token
    verb = "LAUNCHING" if launching else "TERMINATING"
    subject = f"Auto Scaling:  Lifecycle action '{verb}' for instance {state.instance.id} in progress."
    _deliver_quietly(getattr(hook, "notification_target_arn", None), msg, subject)

    detail: dict[str, Any] = {
        "LifecycleActionToken": token,
        "AutoScalingGroupName": group.name,
        "LifecycleHookName": hook.name,
        "EC2InstanceId": state.instance.id,
        "LifecycleTransition": transition,
        "Origin": origin,
        "Destination": destination,
    }
    if metadata:
        detail["NotificationMetadata"] = metadata
    detail_type = (
        "EC2 Instance-launch Lifecycle Action" if launching
        else "EC2 Instance-terminate Lifecycle Action"
    )
    _put_eventbridge(be.account_id, be.region_name, detail_type, [group.arn], detail)
    return action


def _group_alive(group: Any) -> bool:
    return group.autoscaling_backend.autoscaling_groups.get(group.name) is group


def _remove_and_terminate(group: Any, state: Any) -> None:
    if state in group.instance_states:
        group.instance_states.remove(state)
    try:
        group.autoscaling_backend.ec2_backend.terminate_instances([state.instance.id])
    except Exception:
        pass


def _reconcile(group: Any) -> None:
    if _group_alive(group):
        group.set_desired_capacity(group.desired_capacity)


def _begin_terminations(group: Any, states: list[Any]) -> None:
    """Scale-in / TerminateInstanceInAutoScalingGroup: Terminating:Wait when hooks exist."""
    hooks = [] if getattr(group, "_emu_bypass", False) else _hooks(group.autoscaling_backend, group.name, TERMINATE)
    for st in states:
        _cancel_for_instance(st.instance.id, LAUNCH)
        if hooks:
            st.lifecycle_state = "Terminating:Wait"
            for h in hooks:
                _start_action(group, st, h)
        else:
            _remove_and_terminate(group, st)


def _finish_action(action: dict[str, Any], result: str, by: str) -> None:
    """Apply a lifecycle action result (CompleteLifecycleAction, timeout, hook deletion)."""
    _mark_finished(action, result, by)
    be = M.autoscaling_backends[action["_account"]][action["_region"]]
    group = be.autoscaling_groups.get(action["group"])
    if group is None:
        return
    state = _state_of(group, action["instance_id"])
    if state is None:
        _finish_warm_action(group, action, result)
        return
    iid = action["instance_id"]
    if action["transition"] == LAUNCH:
        if result == "ABANDON":
            _cancel_for_instance(iid, LAUNCH)
            _remove_and_terminate(group, state)
            _reconcile(group)  # launches the replacement (through the launch hooks again)
        elif not _pending_for(iid, LAUNCH) and state.lifecycle_state.startswith("Pending"):
            # (Completed before the descriptions caught up: `Pending` too.)
            state.lifecycle_state = "InService"
    else:
        if result == "ABANDON":  # ABANDON stops the remaining terminate actions
            _cancel_for_instance(iid, TERMINATE)
        if not _pending_for(iid, TERMINATE):
            _remove_and_terminate(group, state)
            _reconcile(group)  # replacement when the desired capacity was not decremented


def _apply_timeouts() -> None:
    """DefaultResult for every pending action past its heartbeat or global timeout (LOCK held)."""
    now = _now()
    for a in list(ACTIONS.values()):
        if a["state"] != "pending":
            continue
        if now >= min(a["_deadline"], a["_global_deadline"]):
            try:
                _finish_action(a, a["_default_result"], "timeout")
            except Exception:
                pass


def _timeout_loop() -> None:
    while True:
        time.sleep(TICK_SECONDS)
        try:
            with LOCK:
                _apply_timeouts()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------
# moto model patches
# --------------------------------------------------------------------------------------------

_orig_replace = M.FakeAutoScalingGroup.replace_autoscaling_group_instances


def replace_autoscaling_group_instances(self: Any, count_needed: int, propagated_tags: dict[str, str]) -> None:
    with LOCK:
        count_needed -= _take_from_pool(self, count_needed)
        if count_needed <= 0:
            _fill_pool(self)
            return
        before = {id(s) for s in self.instance_states}
        _orig_replace(self, count_needed, propagated_tags)
        new_states = [s for s in self.instance_states if id(s) not in before]
        _flush_test_notifications(self)
        if getattr(self, "_emu_bypass", False):
            return
        hooks = _hooks(self.autoscaling_backend, self.name, LAUNCH)
        if not hooks:
            return
        lag = DESCRIBE_LAG["seconds"]
        for st in new_states:
            st.lifecycle_state = "Pending" if lag > 0 else "Pending:Wait"
            for h in hooks:
                _start_action(self, st, h)
            if lag > 0:
                _show_waiting_after(st, lag)
        _fill_pool(self)


def _show_waiting_after(st: Any, lag: float) -> None:
    """Lets the descriptions catch up with a launch action `lag` seconds after it began (the
    action itself is active at once: heartbeats and completions find it)."""
    def catch_up() -> None:
        with LOCK:
            if st.lifecycle_state == "Pending":
                st.lifecycle_state = "Pending:Wait"
    timer = threading.Timer(lag, catch_up)
    timer.daemon = True
    timer.start()


ACTIVE_STATES = ("InService", "Pending", "Pending:Wait", "Pending:Proceed")


def active_instances(self: Any) -> list[Any]:
    # Pending:Wait instances count toward capacity; Terminating:* and Standby ones do not.
    return [x for x in self.instance_states if x.lifecycle_state in ACTIVE_STATES]


def _target_instance_count(self: Any) -> int:
    """moto's computation (mixed instances policies included)."""
    target_capacity = self.desired_capacity or 0
    policy = self.mixed_instances_policy or {}
    is_mixed = policy and len(policy.get("LaunchTemplate", {}).get("Overrides", []))
    if not is_mixed:
        return target_capacity
    overrides = policy["LaunchTemplate"]["Overrides"]
    distribution = policy.get("InstancesDistribution", {})
    on_demand_base = int(distribution.get("OnDemandBaseCapacity", 0))
    percent_above_base = int(distribution.get("OnDemandPercentageAboveBaseCapacity", 100))
    weight_str = overrides[0].get("WeightedCapacity", "1")
    weight = int(weight_str) if str(weight_str).isdigit() else 1
    weight = weight or 1
    if on_demand_base >= target_capacity:
        on_demand, spot = target_capacity, 0
    else:
        above = target_capacity - on_demand_base
        on_demand_above = int(above * percent_above_base) / 100.0
        spot = int(above - on_demand_above)
        on_demand = int(on_demand_base + on_demand_above)
    import math

    return math.ceil(on_demand / weight) + math.ceil(spot / weight)


def set_desired_capacity(self: Any, new_capacity: int | None) -> None:
    with LOCK:
        self.desired_capacity = self.min_size if new_capacity is None else new_capacity
        current = self.active_instances()
        delta = _target_instance_count(self) - len(current)
        if delta > 0:
            self.replace_autoscaling_group_instances(delta, self.get_propagated_tags())
        elif delta < 0:
            candidates = [s for s in current if not s.protected_from_scale_in][: -delta]
            if candidates and _reuses_on_scale_in(self):
                _return_to_pool(self, candidates)
            elif candidates:
                _begin_terminations(self, candidates)
        if delta != 0:
            _fill_pool(self)
        if self.name in self.autoscaling_backend.autoscaling_groups:
            self.autoscaling_backend.update_attached_elbs(self.name)
            self.autoscaling_backend.update_attached_target_groups(self.name)


M.FakeAutoScalingGroup.replace_autoscaling_group_instances = replace_autoscaling_group_instances
M.FakeAutoScalingGroup.active_instances = active_instances
M.FakeAutoScalingGroup.set_desired_capacity = set_desired_capacity


_orig_terminate_instance = M.AutoScalingBackend.terminate_instance


def terminate_instance(self: Any, instance_id: str, should_decrement: bool) -> Any:
    with LOCK:
        state = None
        for group in self.autoscaling_groups.values():
            state = _state_of(group, instance_id)
            if state is not None:
                break
        if state is None:
            warm = _warm_state_of(self, instance_id)
            if warm is not None:
                return _terminate_from_pool(*warm)
            raise ValidationError(
                f"Instance Id not found - No managed instance found for instance ID: {instance_id}"
            )
        group = state.auto_scaling_group
        if should_decrement and group.min_size is not None and (group.desired_capacity or 0) <= group.min_size:
            raise ValidationError(
                f"Currently, desiredCapacity={group.desired_capacity} and minSize={group.min_size}. "
                "Terminating instance without replacement will violate group's min size constraint."
            )
        if state.lifecycle_state.startswith("Terminating"):
            return M.TerminateInstanceActivity(state.instance, group.desired_capacity)
        if not _hooks(self, group.name, TERMINATE):
            _cancel_for_instance(instance_id, LAUNCH)
            return _orig_terminate_instance(self, instance_id, should_decrement)
        original_size = group.desired_capacity
        if should_decrement:
            group.desired_capacity = (group.desired_capacity or 0) - 1
        activity = M.TerminateInstanceActivity(state.instance, original_size)
        _begin_terminations(group, [state])
        return activity


_orig_detach = M.AutoScalingBackend.detach_instances


def detach_instances(self: Any, group_name: str, instance_ids: list[str], should_decrement: bool) -> Any:
    with LOCK:
        for iid in instance_ids:
            _cancel_for_instance(iid)
        return _orig_detach(self, group_name, instance_ids, should_decrement)


_orig_notify_terminate = M.AutoScalingBackend.notify_terminate_instances


def notify_terminate_instances(self: Any, instance_ids: list[str]) -> None:
    """EC2 TerminateInstances on group members (outside Auto Scaling)."""
    with LOCK:
        for iid in instance_ids:
            _cancel_for_instance(iid)
        _orig_notify_terminate(self, instance_ids)


_orig_delete_group = M.AutoScalingBackend.delete_auto_scaling_group


def delete_auto_scaling_group(self: Any, group_name: str) -> None:
    with LOCK:
        group = self.autoscaling_groups.get(group_name)
        if group is None:
            return _orig_delete_group(self, group_name)
        # Deleting a group deletes its outstanding lifecycle actions and hooks, no waiting.
        for a in ACTIONS.values():
            if a["state"] == "pending" and a["group"] == group_name and a["_account"] == self.account_id \
                    and a["_region"] == self.region_name:
                _mark_finished(a, "ABANDON", "cancelled")
        for st in list(group.instance_states):
            if st.lifecycle_state.startswith("Terminating"):
                _remove_and_terminate(group, st)
        group.warm_pool = None  # its instances go with it, and nothing refills it
        for st in list(_warm(group)):
            _drop_from_pool(group, st)
        group._emu_bypass = True
        try:
            _orig_delete_group(self, group_name)
        except Exception:
            group._emu_bypass = False
            raise
        for key in [k for k, h in self.lifecycle_hooks.items() if h.auto_scaling_group_name == group_name]:
            self.lifecycle_hooks.pop(key, None)


M.AutoScalingBackend.terminate_instance = terminate_instance
M.AutoScalingBackend.detach_instances = detach_instances
M.AutoScalingBackend.notify_terminate_instances = notify_terminate_instances
M.AutoScalingBackend.delete_auto_scaling_group = delete_auto_scaling_group


# --------------------------------------------------------------------------------------------
# warm pools
# --------------------------------------------------------------------------------------------
# A group's warm pool (PutWarmPool) holds instances prepared ahead of a scale-out. They are in
# `group._emu_warm`, not in `instance_states`: DescribeAutoScalingGroups does not list them,
# DescribeWarmPool and DescribeAutoScalingInstances do (as in AWS). Lifecycle, after the Auto
# Scaling user guide's warm-pool pages:
#   entering:  Warmed:Pending:Wait (launch hooks, EC2 -> WarmPool) -> Warmed:Stopped (EC2 stop),
#              or Warmed:Running / Warmed:Hibernated per PoolState; ABANDON terminates it.
#   leaving:   a scale-out takes ready pool instances first: started, Pending:Wait (launch
#              hooks, WarmPool -> AutoScalingGroup) -> InService; the pool is refilled.
#   returning: scale-in with InstanceReusePolicy.ReuseOnScaleIn: Warmed:Pending:Wait
#              (terminate hooks, AutoScalingGroup -> WarmPool) -> Warmed:Stopped; ABANDON
#              terminates it instead (the emulator's reading).
#   leaving for good: TerminateInstanceInAutoScalingGroup on a pool instance:
#              Warmed:Terminating:Wait (terminate hooks, WarmPool -> EC2), still stopped.
# Pool size: max(MinSize, MaxGroupPreparedCapacity (default MaxSize) - DesiredCapacity).

WARM_READY = ("Warmed:Stopped", "Warmed:Running", "Warmed:Hibernated")


def _warm(group: Any) -> list[Any]:
    if not hasattr(group, "_emu_warm"):
        group._emu_warm = []
    return group._emu_warm


def _warm_state_of(backend: Any, instance_id: str) -> tuple[Any, Any] | None:
    for group in backend.autoscaling_groups.values():
        for st in _warm(group):
            if st.instance.id == instance_id:
                return group, st
    return None


def _true(v: Any) -> bool:
    return v is True or str(v).lower() == "true"


def _reuses_on_scale_in(group: Any) -> bool:
    pool = getattr(group, "warm_pool", None)
    return pool is not None and _true((pool.instance_reuse_policy or {}).get("ReuseOnScaleIn"))


def _pool_target(group: Any) -> int:
    pool = group.warm_pool
    prepared = pool.max_group_prepared_capacity
    prepared = group.max_size if prepared in (None, -1, "-1") else int(prepared)
    return max(int(pool.min_size or 0), prepared - (group.desired_capacity or 0))


def _stopped_state(group: Any) -> str:
    return {"Running": "Warmed:Running", "Hibernated": "Warmed:Hibernated"}.get(
        group.warm_pool.pool_state if group.warm_pool else "Stopped", "Warmed:Stopped")


def _park(group: Any, st: Any) -> None:
    """The instance waits in the pool: stopped unless the pool keeps them running."""
    st.lifecycle_state = _stopped_state(group)
    if st.lifecycle_state != "Warmed:Running":
        group.autoscaling_backend.ec2_backend.stop_instances([st.instance.id])


def _warm_hooks(group: Any, transition: str, st: Any, places: tuple[str, str]) -> bool:
    """Starts the actions of `transition`'s hooks for a pool instance; False when none."""
    hooks = [] if getattr(group, "_emu_bypass", False) else _hooks(group.autoscaling_backend, group.name, transition)
    for h in hooks:
        _start_action(group, st, h, places)
    return bool(hooks)


def _fill_pool(group: Any) -> None:
    """New instances into the pool until it has its size (none while it has no config)."""
    if getattr(group, "warm_pool", None) is None or not _group_alive(group):
        return
    missing = _pool_target(group) - len(_warm(group))
    if missing <= 0:
        return
    before = {id(s) for s in group.instance_states}
    _orig_replace(group, missing, group.get_propagated_tags())
    new = [s for s in group.instance_states if id(s) not in before]
    for st in new:
        group.instance_states.remove(st)
        _warm(group).append(st)
        st.lifecycle_state = "Warmed:Pending:Wait"
        if not _warm_hooks(group, LAUNCH, st, ("EC2", "WarmPool")):
            _park(group, st)


def _take_from_pool(group: Any, count: int) -> int:
    """A scale-out takes ready pool instances first. Returns how many it took."""
    ready = [s for s in _warm(group) if s.lifecycle_state in WARM_READY][:max(count, 0)]
    for st in ready:
        _warm(group).remove(st)
        group.instance_states.append(st)
        group.autoscaling_backend.ec2_backend.start_instances([st.instance.id])
        st.lifecycle_state = "Pending:Wait"
        if not _warm_hooks(group, LAUNCH, st, ("WarmPool", "AutoScalingGroup")):
            st.lifecycle_state = "InService"
    return len(ready)


def _return_to_pool(group: Any, states: list[Any]) -> None:
    for st in states:
        _cancel_for_instance(st.instance.id, LAUNCH)
        group.instance_states.remove(st)
        _warm(group).append(st)
        st.lifecycle_state = "Warmed:Pending:Wait"
        if not _warm_hooks(group, TERMINATE, st, ("AutoScalingGroup", "WarmPool")):
            _park(group, st)


def _terminate_from_pool(group: Any, st: Any) -> Any:
    if not st.lifecycle_state.startswith("Warmed:Terminating"):
        _cancel_for_instance(st.instance.id)
        st.lifecycle_state = "Warmed:Terminating:Wait"
        if not _warm_hooks(group, TERMINATE, st, ("WarmPool", "EC2")):
            _drop_from_pool(group, st)
    return M.TerminateInstanceActivity(st.instance, group.desired_capacity)


def _drop_from_pool(group: Any, st: Any) -> None:
    if st in _warm(group):
        _warm(group).remove(st)
    try:
        group.autoscaling_backend.ec2_backend.terminate_instances([st.instance.id])
    except Exception:
        pass
    _fill_pool(group)


def _finish_warm_action(group: Any, action: dict[str, Any], result: str) -> None:
    """A lifecycle action of a pool instance ended (completed, timed out, cancelled)."""
    st = next((s for s in _warm(group) if s.instance.id == action["instance_id"]), None)
    if st is None:
        return
    if result == "ABANDON":
        _cancel_for_instance(st.instance.id, action["transition"])
    if _pending_for(st.instance.id, action["transition"]):
        return
    if st.lifecycle_state == "Warmed:Terminating:Wait" or result == "ABANDON":
        _drop_from_pool(group, st)
    elif st.lifecycle_state == "Warmed:Pending:Wait":
        _park(group, st)


def _warm_instances_of(backend: Any, instance_ids: list[str]) -> list[Any]:
    return [
        st for group in backend.autoscaling_groups.values() for st in _warm(group)
        if not instance_ids or st.instance.id in instance_ids
    ]


_orig_put_warm_pool = M.AutoScalingBackend.put_warm_pool
_orig_describe_as_instances = M.AutoScalingBackend.describe_auto_scaling_instances


def put_warm_pool_model(self: Any, group_name: str, max_group_prepared_capacity: Any, min_size: Any,
                        pool_state: Any, instance_reuse_policy: Any) -> None:
    with LOCK:
        _group_or_error(self, group_name)
        if pool_state not in (None, "Stopped", "Running", "Hibernated"):
            raise ValidationError(f"Invalid PoolState {pool_state}: Stopped, Running or Hibernated")
        _orig_put_warm_pool(self, group_name, max_group_prepared_capacity, min_size, pool_state,
                            instance_reuse_policy)
        _fill_pool(self.autoscaling_groups[group_name])


def describe_auto_scaling_instances_model(self: Any, instance_ids: list[str]) -> list[Any]:
    """Group members and warm pool instances, as AWS lists both."""
    with LOCK:
        return _orig_describe_as_instances(self, instance_ids) + _warm_instances_of(self, instance_ids)


def describe_warm_pool(self: Any) -> Any:
    from moto.core.responses import ActionResult

    with LOCK:
        be = self.autoscaling_backend
        group = _group_or_error(be, self._get_param("AutoScalingGroupName"))
        result = {"WarmPoolConfiguration": group.warm_pool, "Instances": list(_warm(group))}
        return ActionResult(result)


_orig_delete_warm_pool = M.AutoScalingBackend.delete_warm_pool


def delete_warm_pool_model(self: Any, group_name: str) -> None:
    """DeleteWarmPool: the pool's instances are terminated with it (no hooks: ForceDelete)."""
    with LOCK:
        group = _group_or_error(self, group_name)
        for st in list(_warm(group)):
            _cancel_for_instance(st.instance.id)
            _warm(group).remove(st)
            try:
                self.ec2_backend.terminate_instances([st.instance.id])
            except Exception:
                pass
        _orig_delete_warm_pool(self, group_name)


M.AutoScalingBackend.put_warm_pool = put_warm_pool_model
M.AutoScalingBackend.delete_warm_pool = delete_warm_pool_model
M.AutoScalingBackend.describe_auto_scaling_instances = describe_auto_scaling_instances_model


# --------------------------------------------------------------------------------------------
# moto response patches (Auto Scaling API)
# --------------------------------------------------------------------------------------------


def _group_or_error(be: Any, name: str | None) -> Any:
    group = be.autoscaling_groups.get(name) if name else None
    if group is None:
        raise ValidationError(f"Group {name} not found")
    return group


def _validated_hook_fields(name: Any, transition: Any, heartbeat: Any, default_result: Any) -> None:
    if not name or not re.fullmatch(r"[A-Za-z0-9\-_/]{1,255}", str(name)):
        raise ValidationError(
            f"1 validation error detected: Value '{name}' at 'lifecycleHookName' failed to satisfy "
            "constraint: Member must satisfy regular expression pattern: [A-Za-z0-9\\-_\\/]+"
        )
    if transition not in TRANSITIONS:
        raise ValidationError(
            f"Invalid Lifecycle Transition: {transition}. Valid values are "
            f"{LAUNCH} and {TERMINATE}"
        )
    # AWS's range is 30..7200; shorter timeouts are accepted here so tests can run fast.
    if heartbeat is not None and not (1 <= int(heartbeat) <= 7200):
        raise ValidationError(f"Heartbeat timeout {heartbeat} must be between 30 and 7200 seconds")
    if default_result is not None and default_result not in RESULTS:
        raise ValidationError(
            f"Invalid default result: {default_result}. Valid values are CONTINUE and ABANDON"
        )


def _apply_hook_fields(hook: Any, transition: Any, heartbeat: Any, default_result: Any,
                       target: Any, role: Any, metadata: Any, new: bool) -> None:
    if transition is not None:
        hook.lifecycle_transition = transition
    if heartbeat is not None:
        hook.heartbeat_timeout = int(heartbeat)
    elif new:
        hook.heartbeat_timeout = 3600
    if default_result is not None:
        hook.default_result = default_result
    elif new:
        hook.default_result = "ABANDON"
    hook.global_timeout = min(100 * int(hook.heartbeat_timeout), MAX_GLOBAL_TIMEOUT)
    if new:  # moto hard-codes placeholder ARNs; a new hook has only what was given
        hook.notification_target_arn = None
        hook.role_arn = None
        hook.notification_metadata = None
    if target is not None:
        hook.notification_target_arn = target or None  # "" clears the current target
    if role is not None:
        hook.role_arn = role or None
    if metadata is not None:
        hook.notification_metadata = metadata or None


def put_lifecycle_hook(self: Any) -> Any:
    with LOCK:
        be = self.autoscaling_backend
        group_name = self._get_param("AutoScalingGroupName")
        name = self._get_param("LifecycleHookName")
        group = _group_or_error(be, group_name)
        key = f"{group_name}_{name}"
        existing = be.lifecycle_hooks.get(key)
        transition = self._get_param("LifecycleTransition")
        heartbeat = self._get_int_param("HeartbeatTimeout")
        default_result = self._get_param("DefaultResult")
        target = self._get_param("NotificationTargetARN")
        role = self._get_param("RoleARN")
        metadata = self._get_param("NotificationMetadata")
        _validated_hook_fields(
            name, transition if transition is not None or existing is None else existing.lifecycle_transition,
            heartbeat, default_result,
        )
        if existing is None and len(_hooks(be, group_name)) >= 50:
            raise AutoscalingClientError(
                "LimitExceeded", f"Max number of lifecycle hooks (50) reached for group {group_name}"
            )
        hook = existing if existing is not None else M.LifecycleHook(name, group_name, transition, None, None)
        candidate = copy.copy(hook)
        _apply_hook_fields(candidate, transition, heartbeat, default_result, target, role, metadata,
                           new=existing is None)
        if target:  # AWS sends a test message whenever a notification target is specified
            msg, subject = _test_notification(group, candidate)
            try:
                _deliver(target, msg, subject)
            except Exception:
                raise ValidationError(
                    f"Unable to publish test message to notification target {target} using IAM role "
                    f"{candidate.role_arn}. Please check your target and role configuration and try "
                    "to put lifecycle hook again."
                )
        hook.__dict__.update(candidate.__dict__)
        be.lifecycle_hooks[key] = hook
        return EmptyResult()


def describe_lifecycle_hooks(self: Any) -> Any:
    with LOCK:
        _group_or_error(self.autoscaling_backend, self._get_param("AutoScalingGroupName"))
        return _orig_describe_hooks(self)


def delete_lifecycle_hook(self: Any) -> Any:
    with LOCK:
        be = self.autoscaling_backend
        group_name = self._get_param("AutoScalingGroupName")
        name = self._get_param("LifecycleHookName")
        _group_or_error(be, group_name)
        key = f"{group_name}_{name}"
        if key not in be.lifecycle_hooks:
            raise ValidationError(f"No Lifecycle Hook found with name {name} for group {group_name}")
        be.lifecycle_hooks.pop(key, None)
        # Outstanding actions are completed first: ABANDON when launching, CONTINUE when terminating.
        for a in list(ACTIONS.values()):
            if a["state"] == "pending" and a["group"] == group_name and a["hook"] == name \
                    and a["_account"] == be.account_id and a["_region"] == be.region_name:
                _finish_action(a, "ABANDON" if a["transition"] == LAUNCH else "CONTINUE", "cancelled")
        return EmptyResult()


def create_auto_scaling_group(self: Any) -> Any:
    with LOCK:
        be = self.autoscaling_backend
        name = self._get_param("AutoScalingGroupName")
        if name in be.autoscaling_groups:
            raise AutoscalingClientError(
                "AlreadyExists",
                f"AutoScalingGroup by this name already exists - A group with the name {name} already exists",
            )
        specs = self._get_param("LifecycleHookSpecificationList") or []
        added = []
        for spec in specs:
            hname = spec.get("LifecycleHookName")
            transition = spec.get("LifecycleTransition")
            heartbeat = spec.get("HeartbeatTimeout")
            default_result = spec.get("DefaultResult")
            _validated_hook_fields(hname, transition, heartbeat, default_result)
            hook = M.LifecycleHook(hname, name, transition, None, None)
            _apply_hook_fields(hook, transition, heartbeat, default_result,
                               spec.get("NotificationTargetARN"), spec.get("RoleARN"),
                               spec.get("NotificationMetadata"), new=True)
            hook._emu_test_pending = bool(hook.notification_target_arn)
            added.append(f"{name}_{hname}")
            be.lifecycle_hooks[f"{name}_{hname}"] = hook
        try:
            result = _orig_create_group(self)
        except Exception:
            for key in added:
                be.lifecycle_hooks.pop(key, None)
            raise
        group = be.autoscaling_groups.get(name)
        if group is not None:
            _flush_test_notifications(group)
        return result


def _find_action(self: Any) -> dict[str, Any]:
    be = self.autoscaling_backend
    group_name = self._get_param("AutoScalingGroupName")
    hook_name = self._get_param("LifecycleHookName")
    token = self._get_param("LifecycleActionToken")
    instance_id = self._get_param("InstanceId")
    _group_or_error(be, group_name)
    if f"{group_name}_{hook_name}" not in be.lifecycle_hooks:
        raise ValidationError(f"No Lifecycle Hook found with name {hook_name} for group {group_name}")
    if token is not None and len(token) != 36:
        raise ValidationError(
            f"1 validation error detected: Value '{token}' at 'lifecycleActionToken' failed to satisfy "
            f"constraint: Member must have length {'greater' if len(token) < 36 else 'less'} than or equal to 36"
        )
    if not token and not instance_id:
        raise ValidationError("Either LifecycleActionToken or InstanceId must be provided")
    # An action past its timeout is over whether or not the sweep has run yet.
    _apply_timeouts()
    for a in ACTIONS.values():
        if (a["state"] == "pending" and a["group"] == group_name and a["hook"] == hook_name
                and a["_account"] == be.account_id and a["_region"] == be.region_name
                and (a["token"] == token if token else a["instance_id"] == instance_id)
                and (not instance_id or a["instance_id"] == instance_id)):
            return a
    if token:
        raise ValidationError(f"No active Lifecycle Action found with token {token}")
    raise ValidationError(f"No active Lifecycle Action found with instance ID {instance_id}")


def complete_lifecycle_action(self: Any) -> Any:
    with LOCK:
        result = self._get_param("LifecycleActionResult")
        action = _find_action(self)
        if result not in RESULTS:
            raise ValidationError(
                f"1 validation error detected: Value '{result}' at 'lifecycleActionResult' failed to "
                "satisfy constraint: Member must satisfy enum value set: [CONTINUE, ABANDON]"
            )
        action["completions"] += 1
        _finish_action(action, result, "complete")
        return EmptyResult()


def record_lifecycle_action_heartbeat(self: Any) -> Any:
    with LOCK:
        action = _find_action(self)
        action["heartbeats"] += 1
        action["_deadline"] = _now() + action["_heartbeat_timeout"]
        return EmptyResult()


_orig_describe_hooks = R.AutoScalingResponse.describe_lifecycle_hooks
_orig_create_group = R.AutoScalingResponse.create_auto_scaling_group
R.AutoScalingResponse.put_lifecycle_hook = put_lifecycle_hook
R.AutoScalingResponse.describe_lifecycle_hooks = describe_lifecycle_hooks
R.AutoScalingResponse.delete_lifecycle_hook = delete_lifecycle_hook
R.AutoScalingResponse.create_auto_scaling_group = create_auto_scaling_group
R.AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action
R.AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat
R.AutoScalingResponse.describe_warm_pool = describe_warm_pool


# --------------------------------------------------------------------------------------------
# WSGI wrapper: control endpoints, call counting, fault injection
# --------------------------------------------------------------------------------------------

_CREDENTIAL_RE = re.compile(r"Credential=[^/,\s]+/\d{8}/([^/,\s]+)/([^/,\s]+)/aws4_request")
_QUERY_NAMESPACES = {
    "autoscaling": "http://autoscaling.amazonaws.com/doc/2011-01-01/",
    "sns": "http://sns.amazonaws.com/doc/2010-03-31/",
    "sqs": "http://queue.amazonaws.com/doc/2012-11-05/",
    "sts": "https://sts.amazonaws.com/doc/2011-06-15/",
    "iam": "https://iam.amazonaws.com/doc/2010-05-08/",
    "cloudformation": "http://cloudformation.amazonaws.com/doc/2010-05-15/",
    "monitoring": "http://monitoring.amazonaws.com/doc/2010-08-01/",
    "elasticloadbalancing": "http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/",
}


def _read_body(environ: dict[str, Any]) -> bytes:
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    length = environ.get("CONTENT_LENGTH")
    try:
        if length:
            body = stream.read(int(length))
        elif environ.get("wsgi.input_terminated"):
            body = stream.read()
        else:
            body = b""
    except Exception:
        body = b""
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return body


def _identify(environ: dict[str, Any], body: bytes) -> tuple[str, str, str]:
    """(service, action, protocol) of an AWS request; protocol is json, ec2 or query."""
    service = "unknown"
    auth = environ.get("HTTP_AUTHORIZATION", "")
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    m = _CREDENTIAL_RE.search(auth)
    if m:
        service = m.group(2)
    elif query.get("X-Amz-Credential"):
        parts = query["X-Amz-Credential"][0].split("/")
        if len(parts) >= 4:
            service = parts[3]
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    content_type = environ.get("CONTENT_TYPE", "")
    action = None
    protocol = "query"
    if target:
        action = target.split(".", 1)[-1]
        protocol = "json"
    else:
        if query.get("Action"):
            action = query["Action"][0]
        elif body and ("x-www-form-urlencoded" in content_type or not content_type):
            try:
                form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
                if form.get("Action"):
                    action = form["Action"][0]
            except Exception:
                pass
    if "json" in content_type and target:
        protocol = "json"
    elif service == "ec2":
        protocol = "ec2"
    if service == "unknown" and target.startswith("AmazonSQS."):
        service = "sqs"
    elif service == "unknown" and target.startswith("AmazonSSM."):
        service = "ssm"
    elif service == "unknown" and target.startswith("OpsWorks_20130218."):
        service = "opsworks"
    if action is None:
        action = f"{environ.get('REQUEST_METHOD', 'GET')} {environ.get('PATH_INFO', '/')}"
    return service, action, protocol


# The SDKs' app id (AppName in the Rust SDK, user_agent_appid in botocore): `app/<name>`, where
# <name> is made of the header token characters (so it ends at a space or the next `/`).
_APP_RE = re.compile(r"(?:^|\s)app/([A-Za-z0-9!#$%&'*+.^_`|~-]+)")


def _apps(environ: dict[str, Any]) -> set[str]:
    """The app names a request's User-Agent / X-Amz-User-Agent headers carry."""
    apps: set[str] = set()
    for header in ("HTTP_USER_AGENT", "HTTP_X_AMZ_USER_AGENT"):
        apps.update(_APP_RE.findall(environ.get(header, "")))
    return apps


def _fault_matches(fault: dict[str, Any], service: str, action: str, key: str | None) -> bool:
    fs, fa = fault.get("service") or "*", fault.get("action") or "*"
    fk = fault.get("access_key")
    return ((fs == "*" or fs.lower() == service.lower()) and (fa == "*" or fa.lower() == action.lower())
            and (fk is None or fk == key))


_ACCESS_KEY_RE = re.compile(r"Credential=([^/,\s]+)/")


def _access_key(environ: dict[str, Any]) -> str | None:
    """The access key id a request was signed with (one client among several)."""
    m = _ACCESS_KEY_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
    return m.group(1) if m else None


def _take_faults(service: str, action: str, key: str | None = None) -> tuple[float, str | None]:
    """Consume the first matching delay fault and the first matching error fault (in order);
    a fault with an `access_key` matches only requests signed with it."""
    delay, error = 0.0, None
    with LOCK:
        took_delay = took_error = False
        for fault in FAULTS:
            if fault["count"] == 0 or not _fault_matches(fault, service, action, key):
                continue
            is_delay = fault.get("error") is None
            if (is_delay and took_delay) or (not is_delay and took_error):
                continue
            if fault["count"] > 0:
                fault["count"] -= 1
            if is_delay:
                took_delay, delay = True, float(fault.get("delay_seconds") or 0)
            else:
                took_error, error = True, fault["error"]
        FAULTS[:] = [f for f in FAULTS if f["count"] != 0]
    return delay, error


# What an injected fault answers:
#   throttle      the service's throttling error (HTTP 400, or EC2's 503 RequestLimitExceeded)
#   server        HTTP 500 InternalFailure (EC2: InternalError)
#   contention    HTTP 500 ResourceContention (documented for Auto Scaling's actions)
#   server-nocode HTTP 500 with an empty body: no error code at all
#   html          HTTP 503 with a proxy's HTML page
#   reset         no answer: the connection is reset (TCP RST)
#   http429       HTTP 429 Too Many Requests with a plain body (a proxy or gateway's rate limit)
#   http408       HTTP 408 Request Timeout with a plain body (a proxy that gave up reading)
#   hang          no answer at all: the request is not served and the connection stays open
#                 until the client gives up on it (its attempt timeout) and closes it, or
#                 HANG_MAX_SECONDS pass (then it is reset)
FAULT_KINDS = ("throttle", "server", "contention", "server-nocode", "html", "reset", "http429", "http408",
               "hang")
HANG_MAX_SECONDS = 300.0


def _bare_error_response(kind: str) -> tuple[str, list, bytes] | None:
    """The faults that carry no AWS error document."""
    if kind == "server-nocode":
        return "500 Internal Server Error", [("Content-Type", "text/plain")], b""
    if kind == "http429":
        return "429 Too Many Requests", [("Content-Type", "text/plain")], b"Too Many Requests"
    if kind == "http408":
        return "408 Request Timeout", [("Content-Type", "text/plain")], b"Request Timeout"
    if kind == "html":
        body = (b"<html><head><title>503 Service Temporarily Unavailable</title></head><body>"
                b"<center><h1>503 Service Temporarily Unavailable</h1></center></body></html>")
        return "503 Service Temporarily Unavailable", [("Content-Type", "text/html")], body
    return None


def _reset_connection(environ: dict[str, Any]) -> None:
    """Drops the client's connection, answering nothing: shut down at once (the request
    handler still holds the socket, so a close would wait for it), and with SO_LINGER 0 so
    that its close ends in a TCP RST."""
    import socket
    import struct

    sock = environ.get("werkzeug.socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _hang(environ: dict[str, Any]) -> None:
    """Answers nothing until the client closes the connection (a read at its end of the
    stream), bounded by HANG_MAX_SECONDS; the request is never served."""
    import socket

    sock = environ.get("werkzeug.socket")
    deadline = time.monotonic() + HANG_MAX_SECONDS
    while sock is not None and time.monotonic() < deadline:
        try:
            if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                return
        except BlockingIOError:
            pass
        except OSError:
            return
        time.sleep(0.05)


def _error_response(service: str, protocol: str, kind: str, environ: dict[str, Any]) -> tuple[str, list, bytes]:
    request_id = str(uuid.uuid4())
    bare = _bare_error_response(kind)
    if bare is not None:
        status, headers, body = bare
        return status, headers + [("x-amzn-RequestId", request_id)], body
    throttle = kind == "throttle"
    if protocol == "ec2":
        code, message, status = (
            ("RequestLimitExceeded", "Request limit exceeded.", "503 Service Unavailable") if throttle
            else ("InternalError", "An internal error has occurred.", "500 Internal Server Error")
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
            f"<RequestID>{request_id}</RequestID></Response>"
        )
        headers = [("Content-Type", "text/xml;charset=UTF-8"), ("x-amzn-RequestId", request_id)]
        return status, headers, body.encode()
    if throttle:
        status = "400 Bad Request"
        code = "RequestThrottled" if service == "sqs" else ("Throttling" if protocol == "query" else "ThrottlingException")
        message = "Request is throttled." if service == "sqs" else "Rate exceeded"
        fault_type = "Sender"
    elif kind == "contention":
        status = "500 Internal Server Error"
        code = "ResourceContention"
        message = "You already have a pending update to an Auto Scaling resource."
        fault_type = "Receiver"
    else:
        status = "500 Internal Server Error"
        code = "InternalFailure"
        message = "The request processing has failed because of an unknown error, exception or failure."
        fault_type = "Receiver"
    if protocol == "json":
        type_name = f"com.amazonaws.sqs#{code}" if service == "sqs" else code
        ctype = environ.get("CONTENT_TYPE") or "application/x-amz-json-1.0"
        headers = [("Content-Type", ctype), ("x-amzn-RequestId", request_id),
                   ("x-amzn-query-error", f"{code};{fault_type}")]
        return status, headers, json.dumps({"__type": type_name, "message": message}).encode()
    ns = _QUERY_NAMESPACES.get(service, f"http://{service}.amazonaws.com/doc/")
    body = (
        f'<ErrorResponse xmlns="{ns}"><Error><Type>{fault_type}</Type><Code>{code}</Code>'
        f"<Message>{message}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>"
    )
    headers = [("Content-Type", "text/xml"), ("x-amzn-RequestId", request_id)]
    return status, headers, body.encode()


def _public_action(a: dict[str, Any]) -> dict[str, Any]:
    return {k: a[k] for k in PUBLIC_ACTION_KEYS}


def _clear_emulator_state() -> None:
    DESCRIBE_LAG["seconds"] = 0.0
    ACTIONS.clear()
    CALLS.clear()
    CALLS_BY_APP.clear()
    FAULTS.clear()
    for extension in EXTENSIONS:
        extension.reset()


def _clock(method: str, body: bytes, start_response: Any) -> list[bytes]:
    """GET: Auto Scaling's clock. POST {"advance_seconds": N}: moves it N seconds on (never
    back) and applies the timeouts that passed meanwhile before answering (LOCK held)."""
    global CLOCK_OFFSET
    if method == "POST":
        try:
            advance = float(json.loads(body or b"{}").get("advance_seconds", 0))
            if advance < 0:
                raise ValueError("advance_seconds must be >= 0")
        except (ValueError, TypeError, AttributeError) as exc:
            return _json_reply(start_response, "400 Bad Request", {"error": str(exc)})
        CLOCK_OFFSET += advance
        _apply_timeouts()
    return _json_reply(start_response, "200 OK", {"now": _now(), "advanced_seconds": CLOCK_OFFSET})


# EC2 Spot warnings sent through /_emulator/spot: what was sent, and when EC2 terminated.
SPOT: list[dict[str, Any]] = []
SPOT_NOTICE_SECONDS = 120


def _spot(method: str, body: bytes) -> tuple[str, Any]:
    """POST {"instance_id", "kind": "interruption"|"rebalance", "notice_seconds": N}: EC2 warns
    through EventBridge (source aws.ec2) as AWS documents. An interruption warning is dated
    so that the instance goes `notice_seconds` from now (120 s after the warning, as in AWS;
    fewer when the warning reached its reader late); Auto Scaling starts terminating the
    instance through its terminate hooks at once, and EC2 terminates it at the deadline
    whatever the hooks say. GET lists the warnings sent."""
    if method == "GET":
        return "200 OK", {"warnings": SPOT}
    if method != "POST":
        return "405 Method Not Allowed", {"error": "GET or POST"}
    try:
        spec = json.loads(body or b"{}")
        iid = str(spec["instance_id"])
        kind = str(spec.get("kind", "interruption"))
        notice = float(spec.get("notice_seconds", SPOT_NOTICE_SECONDS))
        if kind not in ("interruption", "rebalance") or not 0 < notice <= SPOT_NOTICE_SECONDS:
            raise ValueError("kind: interruption|rebalance; notice_seconds: (0, 120]")
    except (ValueError, TypeError, KeyError) as exc:
        return "400 Bad Request", {"error": str(exc)}
    found = [(g, st) for be in _autoscaling_backends() for g in be.autoscaling_groups.values()
             if (st := _state_of(g, iid)) is not None]
    if not found:
        return "404 Not Found", {"error": f"{iid} is in no group"}
    group, state = found[0]
    be = group.autoscaling_backend
    arn = f"arn:aws:ec2:{be.region_name}:{be.account_id}:instance/{iid}"
    now = _now()
    if kind == "rebalance":
        _put_eventbridge(be.account_id, be.region_name, "EC2 Instance Rebalance Recommendation",
                         [arn], {"instance-id": iid}, source="aws.ec2", at=now)
        SPOT.append({"instance_id": iid, "kind": kind, "time": now})
        return "200 OK", {"sent": kind}
    warned = now - (SPOT_NOTICE_SECONDS - notice)
    _put_eventbridge(be.account_id, be.region_name, "EC2 Spot Instance Interruption Warning",
                     [arn], {"instance-id": iid, "instance-action": "terminate"},
                     source="aws.ec2", at=warned)
    record = {"instance_id": iid, "kind": kind, "time": warned, "deadline": now + notice,
              "terminated_at": None}
    SPOT.append(record)
    if not state.lifecycle_state.startswith("Terminating"):
        _begin_terminations(group, [state])
    threading.Timer(notice, _spot_terminate, args=(be, iid, record)).start()
    return "200 OK", {"sent": kind, "deadline": record["deadline"]}


def _spot_terminate(be: Any, iid: str, record: dict[str, Any]) -> None:
    """The deadline: EC2 terminates the instance, whatever its lifecycle actions say."""
    with LOCK:
        try:
            be.ec2_backend.terminate_instances([iid])
        except Exception:
            pass
        record["terminated_at"] = _now()


def _autoscaling_backends() -> list[Any]:
    return [b for region in M.autoscaling_backends.values() for b in region.values()]


def _json_reply(start_response: Any, status: str, payload: Any) -> list[bytes]:
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _control(environ: dict[str, Any], start_response: Any, path: str) -> list[bytes]:
    method = environ.get("REQUEST_METHOD", "GET").upper()
    body = _read_body(environ)
    with LOCK:
        if path == "/_emulator/health":
            return _json_reply(start_response, "200 OK", {"status": "ok", "pid": os.getpid()})
        if path == "/_emulator/clock":
            return _clock(method, body, start_response)
        if path == "/_emulator/lag" and method == "POST":
            spec = json.loads(body or b"{}")
            DESCRIBE_LAG["seconds"] = max(0.0, float(spec.get("describe_seconds", 0)))
            return _json_reply(start_response, "200 OK", {"describe_seconds": DESCRIBE_LAG["seconds"]})
        if path == "/_emulator/lifecycle" and method == "GET":
            actions = sorted(ACTIONS.values(), key=lambda a: a["created"])
            return _json_reply(start_response, "200 OK", {"actions": [_public_action(a) for a in actions]})
        if path == "/_emulator/calls" and method == "GET":
            by_app = {app: dict(calls) for app, calls in CALLS_BY_APP.items()}
            return _json_reply(start_response, "200 OK", {"calls": dict(CALLS), "by_app": by_app})
        if path == "/_emulator/calls/reset" and method == "POST":
            CALLS.clear()
            CALLS_BY_APP.clear()
            return _json_reply(start_response, "200 OK", {"calls": {}})
        if path == "/_emulator/faults":
            if method == "GET":
                return _json_reply(start_response, "200 OK", {"faults": FAULTS})
            if method == "DELETE":
                FAULTS.clear()
                return _json_reply(start_response, "200 OK", {"faults": []})
            if method == "POST":
                try:
                    spec = json.loads(body or b"{}")
                    if not isinstance(spec, dict):
                        raise ValueError("body must be a JSON object")
                    fault: dict[str, Any] = {
                        "service": str(spec.get("service") or "*"),
                        "action": str(spec.get("action") or "*"),
                        "count": int(spec.get("count", 1)),
                    }
                    if spec.get("access_key") is not None:
                        fault["access_key"] = str(spec["access_key"])
                    if spec.get("error") is not None:
                        if spec["error"] not in FAULT_KINDS:
                            raise ValueError(f"error must be one of {', '.join(FAULT_KINDS)}")
                        fault["error"] = spec["error"]
                    elif spec.get("delay_seconds") is not None:
                        fault["delay_seconds"] = float(spec["delay_seconds"])
                        if fault["delay_seconds"] < 0:
                            raise ValueError("delay_seconds must be >= 0")
                    else:
                        raise ValueError(f'give "error" ({"|".join(FAULT_KINDS)}) or "delay_seconds"')
                    if fault["count"] == 0 or fault["count"] < -1:
                        raise ValueError("count must be a positive integer or -1")
                except (ValueError, TypeError) as exc:
                    return _json_reply(start_response, "400 Bad Request", {"error": str(exc)})
                FAULTS.append(fault)
                return _json_reply(start_response, "200 OK", {"faults": FAULTS})
        if path == "/_emulator/spot":
            return _json_reply(start_response, *_spot(method, body))
        for extension in EXTENSIONS:
            reply = extension.control(method, path, body)
            if reply is not None:
                return _json_reply(start_response, *reply)
        return _json_reply(start_response, "404 Not Found", {"error": f"no such endpoint: {method} {path}"})


class EmulatorApp:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "") or "/"
        if path.startswith("/_emulator"):
            return _control(environ, start_response, path.rstrip("/") or path)
        if path.startswith("/moto-api"):
            if path.rstrip("/") == "/moto-api/reset" and environ.get("REQUEST_METHOD", "").upper() == "POST":
                with LOCK:
                    result = self.inner(environ, start_response)
                    _clear_emulator_state()
                    return result
            return self.inner(environ, start_response)

        body = _read_body(environ)
        service, action, protocol = _identify(environ, body)
        with LOCK:
            CALLS[f"{service}:{action}"] += 1
            for app in _apps(environ):
                CALLS_BY_APP.setdefault(app, Counter())[f"{service}:{action}"] += 1
        delay, error = _take_faults(service, action, _access_key(environ))
        if delay > 0:
            time.sleep(delay)
        if error == "hang":
            _hang(environ)
            _reset_connection(environ)
            raise ConnectionResetError("fault injection: no answer")
        if error == "reset":
            _reset_connection(environ)
            raise ConnectionResetError("fault injection: connection reset")
        if error is not None:
            status, headers, payload = _error_response(service, protocol, error, environ)
            headers.append(("Content-Length", str(len(payload))))
            start_response(status, headers)
            return [payload]
        if service == "sqs":  # long polling must not hold the lock
            return self.inner(environ, start_response)
        with LOCK:
            for extension in EXTENSIONS:
                reply = extension.dispatch(environ, body)
                if reply is not None:
                    status, headers, payload = reply
                    start_response(status, headers)
                    return [payload]
            result = self.inner(environ, start_response)
            # materialise the body while holding the lock (moto builds it eagerly anyway)
            if not isinstance(result, list):
                try:
                    result = list(result)
                except TypeError:
                    pass
            return result


# --------------------------------------------------------------------------------------------
# server (mirrors moto.server.main)
# --------------------------------------------------------------------------------------------


def _signal_handler(signum: Any, frame: Any) -> None:
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    from werkzeug.serving import make_server, run_simple

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )

    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", type=str, help="Which host to bind", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, help="Port number to use for connection",
                        default=int(os.environ.get("MOTO_PORT", 5000)))
    parser.add_argument("-r", "--reload", action="store_true", help="Reload server on a file change",
                        default=False)
    parser.add_argument("-s", "--ssl", action="store_true",
                        help="Enable SSL encrypted connection with auto-generated certificate (use https://... URL)",
                        default=False)
    parser.add_argument("-c", "--ssl-cert", type=str, help="Path to SSL certificate", default=None)
    parser.add_argument("-k", "--ssl-key", type=str, help="Path to SSL private key", default=None)
    parser.add_argument("--port-file", type=str, default=None,
                        help="Write the port listened on to this file once listening (use with -p 0)")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])

    if "MOTO_PORT" not in os.environ:
        os.environ["MOTO_PORT"] = f"{args.port}"
    try:
        signal.signal(signal.SIGINT, _signal_handler)
        signal.signal(signal.SIGTERM, _signal_handler)
    except Exception:
        pass

    main_app = DomainDispatcherApplication(create_backend_app)
    main_app.debug = True  # type: ignore[attr-defined]

    ssl_context: Any = None
    if args.ssl_key and args.ssl_cert:
        ssl_context = (args.ssl_cert, args.ssl_key)
    elif args.ssl:
        ssl_context = "adhoc"

    if os.environ.get("EMULATOR_QUIET", "") not in ("", "0", "false"):
        # opt-in: no per-request access log lines (werkzeug logs them to stderr by default)
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)

    threading.Thread(target=_timeout_loop, name="lifecycle-timeouts", daemon=True).start()
    if args.port_file:
        server = make_server(args.host, args.port, EmulatorApp(main_app), threaded=True,
                             request_handler=MotoRequestHandler, ssl_context=ssl_context)
        if args.port == 0:  # moto builds URLs (queue URLs) from it
            os.environ["MOTO_PORT"] = str(server.port)
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{server.port}\n")
        os.replace(tmp, args.port_file)
        server.serve_forever()
        return
    run_simple(
        args.host,
        args.port,
        EmulatorApp(main_app),
        threaded=True,
        use_reloader=args.reload,
        ssl_context=ssl_context,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()

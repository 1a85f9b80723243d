"""SSM Run Command with a simulated agent, for the emulator (emulator.py routes requests here).

moto's SSM keeps parameters, documents and the rest; this module answers the Run Command
operations (X-Amz-Target ``AmazonSSM.<Op>``):

    DescribeInstanceInformation, SendCommand, ListCommands, ListCommandInvocations,
    GetCommandInvocation, CancelCommand

Simulated agent
    Every running EC2 instance of moto's EC2 backend has an agent that comes Online
    ``online_delay_seconds`` (default 0) after the instance's launch time; instances in
    ``never_online`` never do. Only Online instances are managed nodes: they are listed by
    DescribeInstanceInformation and can receive commands. SendCommand fails with
    InvalidInstanceId when none of the named instances is a managed node; otherwise the others
    get a terminal invocation right away (Status Failed, StatusDetails Undeliverable).

Running AWS-RunShellScript
    Each invocation runs ``/bin/sh -c "<commands joined by newlines>"`` in a thread, in a new
    process group, with stdout/stderr going to files (like the agent, so background children
    don't hold the invocation open). By default the working directory is the instance's sandbox
    ``<base>/<instance-id>/`` (base = $EMULATOR_SSM_SANDBOX, or a temporary directory made on
    first use and removed when the emulator exits) and the environment is minimal (PATH,
    HOME=sandbox, AWS_SSM_INSTANCE_ID, AWS_SSM_REGION_NAME). A control endpoint can give an
    instance a command prefix (``["ip", "netns", "exec", "inst1"]``), a cwd and extra
    environment variables. The document's ``workingDirectory`` parameter wins over both cwds.
    The agent's rules apply: executionTimeout outside 5..172800 s means 3600 s; a timeout or a
    cancel kills the process group and reports ResponseCode 137; a script exiting with 137 is
    reported TimedOut; StandardOutputContent keeps the first 24000 characters (the last 20
    replaced by "--output truncated--"), StandardErrorContent the first 8000, and the plugin
    Output is the agent's 2500-character stdout + "----------ERROR-------" + stderr digest.
    An agent picks an invocation up `pickup_seconds` after SendCommand (per instance, default
    0; until then it is Pending, not yet sent). MaxErrors is honoured as Run Command does:
    once the command's errors (Failed, ExecutionTimedOut) exceed it (a count, or a percentage
    of the targets rounded down; default 0), invocations not yet sent are not sent (Status
    Cancelled, StatusDetails Terminated) while those already running finish. (MaxConcurrency
    is recorded, not enforced.)
    Other documents (AWS-RunPowerShellScript, AWS-ApplyAnsiblePlaybooks, documents created in
    moto) run nothing and succeed with empty output; an unknown document is InvalidDocument.

Control endpoints (JSON), served through ``control()``:
    GET  /_emulator/ssm                      commands, invocations, cancels, sandbox, config
    POST /_emulator/ssm                      {"online_delay_seconds": 2.5,
                                              "never_online": ["i-..."],   (added to the set)
                                              "online": ["i-..."]}         (removed from it)
    GET|POST|DELETE /_emulator/ssm/instances/<instance-id>
                                             {"prefix": [...], "cwd": "...", "env": {...},
                                              "pickup_seconds": 2}
                                             (POST merges; a null value removes that key)

Processes started for commands are also registered with a small reaper process, which kills
their process groups (and removes the temporary sandbox) when the emulator goes away, even
when it is killed with SIGKILL.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

TARGET_PREFIX = "AmazonSSM."
DEFAULT_ACCOUNT = "123456789012"
DEFAULT_REGION = "us-east-1"
SHELL_DOCUMENT = "AWS-RunShellScript"
BUILTIN_DOCUMENTS = {
    "AWS-RunShellScript": "aws:runShellScript",
    "AWS-RunPowerShellScript": "aws:runPowerShellScript",
    "AWS-ApplyAnsiblePlaybooks": "runShellScript",
}
SCRIPT_PARAMETERS = ("commands", "workingDirectory", "executionTimeout")
EXECUTION_TIMEOUT_PATTERN = re.compile(
    r"^(([1-9][0-9]{0,4})|(1[0-6][0-9]{4})|(17[0-1][0-9]{3})|(172[0-7][0-9]{2})|(172800))$"
)
INSTANCE_ID_PATTERN = re.compile(r"^(i-(\w{8}|\w{17}))$|^(mi-\w{17})$")
DEFAULT_EXECUTION_TIMEOUT = 3600
MIN_EXECUTION_TIMEOUT, MAX_EXECUTION_TIMEOUT = 5, 172800  # the agent's bounds
DEFAULT_TIMEOUT_SECONDS = 3600
MAX_STDOUT, MAX_STDERR, MAX_PLUGIN_OUTPUT = 24000, 8000, 2500
TRUNCATED_SUFFIX = "--output truncated--"
STOPPED_EXIT_CODE = 137  # the agent's exit code for a killed (timed out / cancelled) command
AGENT_VERSION = "3.3.1957.0"
PLATFORM_NAME, PLATFORM_VERSION = "Amazon Linux", "2023"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# (Status, StatusDetails) pairs of invocations and plugins
PENDING = ("Pending", "Pending")
IN_PROGRESS = ("InProgress", "InProgress")
SUCCESS = ("Success", "Success")
FAILED = ("Failed", "Failed")
EXECUTION_TIMED_OUT = ("TimedOut", "ExecutionTimedOut")
DELIVERY_TIMED_OUT = ("TimedOut", "DeliveryTimedOut")
CANCELLED = ("Cancelled", "Cancelled")
# The parent command exceeded its MaxErrors and the system cancelled this invocation before
# sending it (the user guide's "Understanding command statuses").
TERMINATED = ("Cancelled", "Terminated")
UNDELIVERABLE = ("Failed", "Undeliverable")
TERMINAL_DETAILS = {"Success", "Failed", "ExecutionTimedOut", "DeliveryTimedOut", "Cancelled",
                    "Undeliverable", "Terminated"}

# Set by emulator.py: the lock that protects moto's backends (used for the S3 output upload,
# which runs outside of a request).
BACKEND_LOCK: Any = None

_LOCK = threading.RLock()  # protects everything below; taken after BACKEND_LOCK, never before
CONFIG: dict[str, Any] = {"online_delay_seconds": 0.0}
NEVER_ONLINE: set[str] = set()
RUNNERS: dict[str, dict[str, Any]] = {}  # instance id -> {"prefix", "cwd", "env", "pickup_seconds"}
COMMANDS: dict[str, "Command"] = {}
CANCELS: list[dict[str, Any]] = []
_SANDBOX: str | None = None
_GENERATION = 0  # bumped by reset(): runner threads of older commands stop touching state


class SsmError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def _validation(message: str) -> SsmError:
    return SsmError("ValidationException", message)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


class Invocation:
    def __init__(self, instance_id: str, instance_name: str) -> None:
        self.instance_id = instance_id
        self.instance_name = instance_name
        self.status, self.details = PENDING
        self.response_code = -1
        self.start: float | None = None
        self.end: float | None = None
        self.stdout = ""
        self.stderr = ""
        self.proc: subprocess.Popen | None = None
        self.cancel_requested = False

    @property
    def terminal(self) -> bool:
        return self.details in TERMINAL_DETAILS


class Command:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
        self.invocations: dict[str, Invocation] = {}
        self.cancelled = False  # CancelCommand was called for it
        self.cancelled_all = False  # ... for all of its instances

    def aggregate(self) -> tuple[str, str, int, int, int]:
        """(Status, StatusDetails, CompletedCount, ErrorCount, DeliveryTimedOutCount)."""
        invs = list(self.invocations.values())
        completed = sum(1 for i in invs if i.terminal)
        errors = sum(1 for i in invs if i.details in ("Failed", "ExecutionTimedOut"))
        delivery = sum(1 for i in invs if i.details == "DeliveryTimedOut")
        if completed < len(invs):
            if self.cancelled_all:
                return "Cancelling", "Cancelling", completed, errors, delivery
            started = any(i.status != "Pending" for i in invs if i.details != "Undeliverable")
            status = "InProgress" if started else "Pending"
            return status, status, completed, errors, delivery
        counted = [i for i in invs if i.details != "Undeliverable"]
        if self.cancelled_all and any(i.details == "Cancelled" for i in counted):
            return "Cancelled", "Cancelled", completed, errors, delivery
        if errors > _max_errors(self.max_errors, len(invs)):
            failed = sum(1 for i in invs if i.details == "Failed")
            pair = FAILED if failed >= errors - failed else EXECUTION_TIMED_OUT
            return pair[0], pair[1], completed, errors, delivery
        if counted and all(i.details == "Success" for i in counted):
            return "Success", "Success", completed, errors, delivery
        if delivery and delivery == len(counted):
            return "TimedOut", "DeliveryTimedOut", completed, errors, delivery
        return "Success", "Incomplete", completed, errors, delivery

    def to_api(self, snapshot_pending: bool = False) -> dict[str, Any]:
        if snapshot_pending:  # SendCommand answers before anything ran, counts at 0
            status, details, completed, errors, delivery = "Pending", "Pending", 0, 0, 0
        else:
            status, details, completed, errors, delivery = self.aggregate()
        out: dict[str, Any] = {
            "CommandId": self.command_id,
            "DocumentName": self.document_name,
            "DocumentVersion": self.document_version,
            "Comment": self.comment,
            "ExpiresAfter": _epoch(self.expires_after),
            "Parameters": self.parameters,
            "InstanceIds": list(self.instance_ids),
            "Targets": self.targets,
            "RequestedDateTime": _epoch(self.requested),
            "Status": status,
            "StatusDetails": details,
            "OutputS3Region": self.output_s3_region,
            "OutputS3BucketName": self.output_s3_bucket_name,
            "OutputS3KeyPrefix": self.output_s3_key_prefix,
            "MaxConcurrency": self.max_concurrency,
            "MaxErrors": self.max_errors,
            "TargetCount": len(self.invocations),
            "CompletedCount": completed,
            "ErrorCount": errors,
            "DeliveryTimedOutCount": delivery,
            "ServiceRole": self.service_role,
            "NotificationConfig": self.notification_config,
            "CloudWatchOutputConfig": self.cloudwatch_output_config,
            "TimeoutSeconds": self.timeout_seconds,
        }
        if self.alarm_configuration is not None:
            out["AlarmConfiguration"] = self.alarm_configuration
        return out


def _max_errors(spec: str, targets: int) -> int:
    spec = str(spec or "0")
    if spec.endswith("%"):
        return math.floor(targets * int(spec[:-1]) / 100)
    return int(spec)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

_CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/\d{8}/([^/,\s]+)/([^/,\s]+)/aws4_request")


def _scope(environ: dict[str, Any]) -> tuple[str, str]:
    """(account, region) of a request, as moto derives them."""
    access_key, region = None, DEFAULT_REGION
    m = _CREDENTIAL_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
    if m:
        access_key, region = m.group(1), m.group(2)
    else:
        cred = parse_qs(environ.get("QUERY_STRING", "")).get("X-Amz-Credential")
        if cred:
            parts = cred[0].split("/")
            access_key = parts[0]
            if len(parts) > 2:
                region = parts[2]
    account = DEFAULT_ACCOUNT
    if access_key:
        try:
            from moto.iam.models import get_account_id_from

            account = get_account_id_from(access_key)
        except Exception:
            pass
    return account, region


def _epoch(t: float | None) -> float | None:
    return None if t is None else round(t, 3)


def _iso(t: float | None) -> str:
    if t is None:
        return ""
    d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def _parse_time(value: str) -> float:
    try:
        v = value.strip().replace("Z", "+00:00")
        d = datetime.datetime.fromisoformat(v)
        if d.tzinfo is None:
            d = d.replace(tzinfo=datetime.timezone.utc)
        return d.timestamp()
    except Exception:
        raise SsmError("InvalidFilterValue", f"Invalid timestamp: {value}")


def _prefix(text: str, limit: int) -> str:
    """The agent's pluginutil.StringPrefix."""
    if len(text) < limit:
        return text
    return text[: limit - len(TRUNCATED_SUFFIX)] + TRUNCATED_SUFFIX


def _plugin_output(stdout: str, stderr: str, capacity: int = MAX_PLUGIN_OUTPUT) -> str:
    """The agent's iohandler.TruncateOutput (stdout, an error banner, stderr)."""
    trunc_out, trunc_err = "\n---Output truncated---", "\n---Error truncated----"
    title = "\n----------ERROR-------\n" if stderr else ""
    space = capacity - len(title)
    if len(stdout) + len(stderr) < space:
        return stdout + title + stderr
    if len(stdout) > space // 2 and len(stderr) > space // 2:
        size = (space - len(trunc_err) - len(trunc_out)) // 2
        return stdout[:size] + trunc_out + title + stderr[:size] + trunc_err
    if len(stdout) < space // 2:
        return stdout + title + stderr[: space - len(trunc_err) - len(stdout)] + trunc_err
    return stdout[: space - len(trunc_out) - len(stderr)] + trunc_out + title + stderr


def _effective_execution_timeout(values: list[str] | None) -> int:
    """The agent's ValidateExecutionTimeout: out-of-range values fall back to 3600 s."""
    if not values:
        return DEFAULT_EXECUTION_TIMEOUT
    raw = str(values[0])
    try:
        num = int(raw)
    except ValueError:
        try:
            num = int(float(raw))
        except ValueError:
            return DEFAULT_EXECUTION_TIMEOUT
    if num < MIN_EXECUTION_TIMEOUT or num > MAX_EXECUTION_TIMEOUT:
        return DEFAULT_EXECUTION_TIMEOUT
    return num


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _paginate(items: list[Any], params: dict[str, Any], default: int, low: int, high: int,
              field: str = "maxResults") -> tuple[list[Any], str | None]:
    max_results = params.get("MaxResults")
    if max_results is None:
        max_results = default
    elif not isinstance(max_results, int) or max_results < low or max_results > high:
        constraint = (f"greater than or equal to {low}" if isinstance(max_results, int)
                      and max_results < low else f"less than or equal to {high}")
        raise _validation(
            f"1 validation error detected: Value '{max_results}' at '{field}' failed to satisfy "
            f"constraint: Member must have value {constraint}"
        )
    offset = 0
    token = params.get("NextToken")
    if token:
        try:
            offset = int(json.loads(base64.urlsafe_b64decode(token.encode()))["offset"])
            if offset < 0 or offset > len(items):
                raise ValueError
        except Exception:
            raise SsmError("InvalidNextToken", "The specified token isn't valid.")
    page = items[offset: offset + max_results]
    nxt = _token(offset + max_results) if offset + max_results < len(items) else None
    return page, nxt


def _check_instance_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not INSTANCE_ID_PATTERN.match(value):
        raise _validation(
            f"1 validation error detected: Value '{value}' at '{field}' failed to satisfy "
            "constraint: Member must satisfy regular expression pattern: "
            "(^i-(\\w{8}|\\w{17})$)|(^mi-\\w{17}$)"
        )
    return value


def _check_command_id(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 36:
        raise _validation(
            f"1 validation error detected: Value '{value}' at 'commandId' failed to satisfy "
            "constraint: Member must have length equal to 36"
        )
    return value


# --------------------------------------------------------------------------------------------
# simulated agents
# --------------------------------------------------------------------------------------------


def _ec2_instances(account: str, region: str) -> list[Any]:
    from moto.ec2.models import ec2_backends

    be = ec2_backends[account][region]
    return [i for r in be.all_reservations() for i in r.instances]


def _launch_ts(instance: Any) -> float:
    lt = getattr(instance, "launch_time", None)
    if isinstance(lt, datetime.datetime):
        if lt.tzinfo is None:
            lt = lt.replace(tzinfo=datetime.timezone.utc)
        return lt.timestamp()
    return 0.0


def _online(instance: Any, now: float) -> bool:
    if getattr(instance, "state", None) != "running" or instance.id in NEVER_ONLINE:
        return False
    return now >= _launch_ts(instance) + float(CONFIG["online_delay_seconds"])


def _computer_name(instance: Any) -> str:
    try:
        return instance.private_dns_name
    except Exception:
        return ""


def _tags(instance: Any) -> dict[str, str]:
    tags = {}
    try:
        for t in instance.get_tags():
            key = t.get("key", t.get("Key"))
            if key is not None:
                tags[key] = t.get("value", t.get("Value", ""))
    except Exception:
        pass
    return tags


def _information(instance: Any, now: float) -> dict[str, Any]:
    return {
        "InstanceId": instance.id,
        "PingStatus": "Online",
        "LastPingDateTime": _epoch(now),
        "AgentVersion": AGENT_VERSION,
        "IsLatestVersion": True,
        "PlatformType": "Linux",
        "PlatformName": PLATFORM_NAME,
        "PlatformVersion": PLATFORM_VERSION,
        "ResourceType": "EC2Instance",
        "IPAddress": instance.private_ip or "",
        "ComputerName": _computer_name(instance),
        "SourceId": instance.id,
        "SourceType": "AWS::EC2::Instance",
    }


_INFO_FILTER_FIELDS = {
    "InstanceIds": "InstanceId",
    "AgentVersion": "AgentVersion",
    "PingStatus": "PingStatus",
    "PlatformTypes": "PlatformType",
    "ResourceType": "ResourceType",
    "SourceIds": "SourceId",
    "SourceTypes": "SourceType",
    "ActivationIds": "ActivationId",
    "IamRole": "IamRole",
    "AssociationStatus": "AssociationStatus",
}
_LEGACY_FILTER_KEYS = ("InstanceIds", "AgentVersion", "PingStatus", "PlatformTypes",
                       "ActivationIds", "IamRole", "ResourceType", "AssociationStatus")
_FILTER_VALUES = {
    "PingStatus": ("Online", "ConnectionLost", "Inactive"),
    "PlatformTypes": ("Windows", "Linux", "MacOS"),
    "ResourceType": ("EC2Instance", "ManagedInstance"),
    "AssociationStatus": ("Success", "Pending", "Failed"),
}


def _info_condition(key: Any, values: Any) -> Any:
    if not isinstance(values, list) or not values:
        raise _validation(
            "1 validation error detected: Value null at 'filters.1.member.values' failed to "
            "satisfy constraint: Member must have length greater than or equal to 1"
        )
    if key == "InstanceIds":
        for v in values:
            if not isinstance(v, str) or not INSTANCE_ID_PATTERN.match(v):
                raise SsmError("InvalidInstanceId", f"Instance id {v} is not valid.")
    if key in _FILTER_VALUES:
        bad = [v for v in values if v not in _FILTER_VALUES[key]]
        if bad:
            raise SsmError("InvalidInstanceInformationFilterValue",
                           f"The filter value {bad[0]} is not valid for key {key}.")
    if key in _INFO_FILTER_FIELDS:
        field = _INFO_FILTER_FIELDS[key]
        return lambda info, inst: info.get(field) in values
    if key == "tag-key":
        return lambda info, inst: any(k in values for k in _tags(inst))
    if isinstance(key, str) and key.startswith("tag:") and len(key) > 4:
        name = key[4:]
        return lambda info, inst: _tags(inst).get(name) in values
    raise SsmError("InvalidFilterKey", f"The filter key {key} is not valid.")


def describe_instance_information(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    filters, legacy = p.get("Filters"), p.get("InstanceInformationFilterList")
    if filters and legacy:
        raise _validation("Filters and InstanceInformationFilterList can't be used together.")
    conditions = [_info_condition(f.get("Key"), f.get("Values")) for f in filters or []]
    for f in legacy or []:
        if f.get("key") not in _LEGACY_FILTER_KEYS:
            raise SsmError("InvalidFilterKey", f"The filter key {f.get('key')} is not valid.")
        conditions.append(_info_condition(f.get("key"), f.get("valueSet")))
    now = time.time()
    rows = []
    for inst in _ec2_instances(account, region):
        if not _online(inst, now):
            continue
        info = _information(inst, now)
        if all(c(info, inst) for c in conditions):
            rows.append(info)
    page, nxt = _paginate(rows, p, 10, 5, 50)
    out: dict[str, Any] = {"InstanceInformationList": page}
    if nxt:
        out["NextToken"] = nxt
    return out


# --------------------------------------------------------------------------------------------
# SendCommand and the runners
# --------------------------------------------------------------------------------------------


def _document(name: str, account: str, region: str) -> tuple[str, bool]:
    """(plugin name, runs shell) of a document; InvalidDocument when it is unknown."""
    if name in BUILTIN_DOCUMENTS:
        return BUILTIN_DOCUMENTS[name], name == SHELL_DOCUMENT
    try:
        from moto.ssm.models import ssm_backends

        docs = ssm_backends[account][region]._documents.get(name)
    except Exception:
        docs = None
    if docs is None:
        raise SsmError("InvalidDocument", "The specified document does not exist.")
    plugin = "aws:runShellScript"
    try:
        content = docs.get_default_version().content_json or {}
        if content.get("mainSteps"):
            plugin = content["mainSteps"][0].get("name") or plugin
        elif content.get("runtimeConfig"):
            plugin = next(iter(content["runtimeConfig"]))
    except Exception:
        pass
    return plugin, False


def _validate_script_parameters(params: dict[str, Any]) -> None:
    for key in params:
        if key not in SCRIPT_PARAMETERS:
            raise SsmError("InvalidParameters", f"Parameter \"{key}\" is not defined in the document.")
    commands = params.get("commands")
    if not commands:
        raise SsmError("InvalidParameters", "Parameter \"commands\" is required.")
    timeout = params.get("executionTimeout")
    if timeout is not None and (len(timeout) != 1 or not EXECUTION_TIMEOUT_PATTERN.match(str(timeout[0]))):
        raise SsmError(
            "InvalidParameters",
            f"Parameter \"executionTimeout\" \"{timeout}\" does not match the allowed pattern "
            f"{EXECUTION_TIMEOUT_PATTERN.pattern}.",
        )


def _resolve_targets(targets: list[dict[str, Any]], account: str, region: str) -> list[str]:
    found: list[str] = []
    now = time.time()
    for inst in _ec2_instances(account, region):
        if not _online(inst, now):
            continue
        tags = _tags(inst)
        ok = True
        for t in targets:
            key, values = t.get("Key") or "", t.get("Values") or []
            if key == "InstanceIds":
                ok = inst.id in values
            elif key == "tag-key":
                ok = any(k in values for k in tags)
            elif key.startswith("tag:"):
                ok = tags.get(key[4:]) in values
            else:
                ok = False
            if not ok:
                break
        if ok:
            found.append(inst.id)
    return found


def send_command(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    doc = p.get("DocumentName")
    if not doc:
        raise _validation("1 validation error detected: Value null at 'documentName' failed to "
                          "satisfy constraint: Member must not be null")
    name = doc.split("document/", 1)[1] if doc.startswith("arn:") and "document/" in doc else doc
    instance_ids = p.get("InstanceIds") or []
    targets = p.get("Targets") or []
    if len(instance_ids) > 50:
        raise _validation(
            f"1 validation error detected: Value '[{', '.join(map(str, instance_ids))}]' at "
            "'instanceIds' failed to satisfy constraint: Member must have length less than or "
            "equal to 50"
        )
    if len(targets) > 5:
        raise _validation("1 validation error detected: Value at 'targets' failed to satisfy "
                          "constraint: Member must have length less than or equal to 5")
    for i, iid in enumerate(instance_ids):
        _check_instance_id(iid, f"instanceIds.{i + 1}.member")
    if instance_ids and targets:
        raise _validation("InstanceIds and Targets can't be specified together.")
    if not instance_ids and not targets:
        raise _validation("Either InstanceIds or Targets must be specified.")
    timeout_seconds = p.get("TimeoutSeconds")
    if timeout_seconds is not None and not (30 <= int(timeout_seconds) <= 2592000):
        raise _validation(
            f"1 validation error detected: Value '{timeout_seconds}' at 'timeoutSeconds' failed to "
            "satisfy constraint: Member must have value "
            + ("greater than or equal to 30" if int(timeout_seconds) < 30
               else "less than or equal to 2592000")
        )
    comment = p.get("Comment") or ""
    if len(comment) > 100:
        raise _validation("1 validation error detected: Value at 'comment' failed to satisfy "
                          "constraint: Member must have length less than or equal to 100")
    parameters = p.get("Parameters") or {}
    if not isinstance(parameters, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in parameters.values()
    ):
        raise SsmError("InvalidParameters", "Parameters must be a map of string lists.")
    plugin, runs_shell = _document(name, account, region)
    if runs_shell:
        _validate_script_parameters(parameters)

    now = time.time()
    by_id = {i.id: i for i in _ec2_instances(account, region)}
    if targets:
        wanted = _resolve_targets(targets, account, region)
    else:
        wanted = list(dict.fromkeys(instance_ids))  # AWS ignores repeated IDs
        valid = [i for i in wanted if i in by_id and _online(by_id[i], now)]
        if not valid:
            raise SsmError(
                "InvalidInstanceId",
                f"Instances [[{', '.join(wanted)}]] not in a valid state for account {account}",
            )
    execution_timeout = _effective_execution_timeout(parameters.get("executionTimeout")) \
        if runs_shell else DEFAULT_EXECUTION_TIMEOUT
    timeout = int(timeout_seconds) if timeout_seconds is not None else DEFAULT_TIMEOUT_SECONDS
    notification = p.get("NotificationConfig") or {}
    cw = p.get("CloudWatchOutputConfig") or {}
    cmd = Command(
        command_id=str(uuid.uuid4()),
        account=account,
        region=region,
        document_name=name,
        document_version=p.get("DocumentVersion") or "$DEFAULT",
        comment=comment,
        parameters=parameters,
        instance_ids=list(instance_ids) if not targets else [],
        targets=targets,
        requested=now,
        timeout_seconds=timeout,
        execution_timeout=execution_timeout,
        expires_after=now + timeout + execution_timeout,
        max_concurrency=p.get("MaxConcurrency") or "50",
        max_errors=p.get("MaxErrors") or "0",
        output_s3_region=p.get("OutputS3Region") or (region if p.get("OutputS3BucketName") else ""),
        output_s3_bucket_name=p.get("OutputS3BucketName") or "",
        output_s3_key_prefix=p.get("OutputS3KeyPrefix") or "",
        service_role=p.get("ServiceRoleArn") or "",
        notification_config={
            **{"NotificationArn": "", "NotificationEvents": []},
            **{k: v for k, v in notification.items() if v is not None},
        },
        cloudwatch_output_config={
            "CloudWatchLogGroupName": cw.get("CloudWatchLogGroupName") or "",
            "CloudWatchOutputEnabled": bool(cw.get("CloudWatchOutputEnabled", False)),
        },
        alarm_configuration=p.get("AlarmConfiguration"),
        plugin_name=plugin,
        runs_shell=runs_shell,
    )
    for iid in wanted:
        inst = by_id.get(iid)
        inv = Invocation(iid, _computer_name(inst) if inst is not None else "")
        if inst is None or not _online(inst, now):
            inv.status, inv.details = UNDELIVERABLE
        cmd.invocations[iid] = inv
    with _LOCK:
        COMMANDS[cmd.command_id] = cmd
        generation = _GENERATION
    script = "\n".join(parameters.get("commands") or []) + "\n"
    workdir = (parameters.get("workingDirectory") or [""])[0]
    for inv in cmd.invocations.values():
        if inv.details == "Pending":
            threading.Thread(
                target=_run if runs_shell else _run_nothing,
                args=(cmd, inv, generation) + ((script, workdir) if runs_shell else ()),
                name=f"ssm-{cmd.command_id[:8]}-{inv.instance_id}",
                daemon=True,
            ).start()
    return {"Command": cmd.to_api(snapshot_pending=True)}


def _run_nothing(cmd: Command, inv: Invocation, generation: int) -> None:
    if not _picked_up(inv, generation):
        return
    with _LOCK:
        if generation != _GENERATION or inv.status != "Pending":
            return
        inv.start = inv.end = time.time()
        inv.response_code = 0
        inv.status, inv.details = SUCCESS


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(f: Any) -> str:
    try:
        f.seek(0)
        return f.read().decode("utf-8", errors="replace")
    except Exception:
        return ""
    finally:
        f.close()


def _picked_up(inv: Invocation, generation: int) -> bool:
    """Waits for the agent to pick the invocation up (its runner's `pickup_seconds`, 0 by
    default); False when it was no longer to be sent by then (cancelled, or terminated
    because the command exceeded MaxErrors)."""
    with _LOCK:
        pickup = float((RUNNERS.get(inv.instance_id) or {}).get("pickup_seconds") or 0)
    if pickup > 0:
        time.sleep(pickup)
    with _LOCK:
        return generation == _GENERATION and inv.status == "Pending"


def _stop_sending(cmd: Command) -> None:
    """MaxErrors: once the command's errors exceed it, the invocations not yet sent are
    not sent (Terminated); those already running go on (LOCK held)."""
    errors = sum(1 for i in cmd.invocations.values() if i.details in ("Failed", "ExecutionTimedOut"))
    if errors <= _max_errors(cmd.max_errors, len(cmd.invocations)):
        return
    now = time.time()
    for inv in cmd.invocations.values():
        if inv.status == "Pending":
            inv.status, inv.details = TERMINATED
            inv.end = now


def _run(cmd: Command, inv: Invocation, generation: int, script: str, workdir: str) -> None:
    if not _picked_up(inv, generation):
        return
    with _LOCK:
        if generation != _GENERATION or inv.status != "Pending":
            return
        inv.status, inv.details = IN_PROGRESS
        inv.start = time.time()
        runner = dict(RUNNERS.get(inv.instance_id) or {})
    sandbox = _sandbox_dir(inv.instance_id)
    cwd = workdir or runner.get("cwd") or sandbox
    env = {"PATH": DEFAULT_PATH, "HOME": sandbox, "AWS_SSM_INSTANCE_ID": inv.instance_id,
           "AWS_SSM_REGION_NAME": cmd.region}
    env.update({str(k): str(v) for k, v in (runner.get("env") or {}).items()})
    argv = [str(a) for a in runner.get("prefix") or []] + ["/bin/sh", "-c", script]
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True)
    except OSError as exc:
        out.close()
        err.close()
        _finish(cmd, inv, generation, FAILED, 1, "", f"failed to run commands: {exc}")
        return
    _track_group(proc.pid)
    with _LOCK:
        inv.proc = proc
        cancel = inv.cancel_requested
    if cancel:
        _kill(proc)
    deadline = min(inv.start + cmd.execution_timeout, cmd.expires_after)
    timed_out = False
    try:
        rc = proc.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc)
        rc = proc.wait()
    stdout, stderr = _read(out), _read(err)
    _untrack_group_if_empty(proc.pid)
    with _LOCK:
        cancelled = inv.cancel_requested
    if cancelled:
        pair, code = CANCELLED, STOPPED_EXIT_CODE
    elif timed_out:
        pair = EXECUTION_TIMED_OUT if deadline < cmd.expires_after else DELIVERY_TIMED_OUT
        code = STOPPED_EXIT_CODE
    elif rc < 0:  # killed by a signal from elsewhere: the agent sees exit status -1
        pair, code = FAILED, -1
    elif rc == 0:
        pair, code = SUCCESS, 0
    elif rc == STOPPED_EXIT_CODE:  # the agent maps 137 to TimedOut
        pair, code = EXECUTION_TIMED_OUT, rc
    else:
        pair, code = FAILED, rc
    _finish(cmd, inv, generation, pair, code, stdout, stderr)


def _finish(cmd: Command, inv: Invocation, generation: int, pair: tuple[str, str], code: int,
            stdout: str, stderr: str) -> None:
    with _LOCK:
        if generation != _GENERATION:
            return
        inv.stdout, inv.stderr = stdout, stderr
        inv.response_code = code
        inv.end = time.time()
        inv.proc = None
        inv.status, inv.details = pair
        _stop_sending(cmd)
    if cmd.output_s3_bucket_name:
        _upload_output(cmd, inv)


def _s3_key(cmd: Command, inv: Invocation, stream: str) -> str:
    plugin_dir = cmd.plugin_name.replace(":", "")
    parts = [cmd.output_s3_key_prefix.strip("/"), cmd.command_id, inv.instance_id, plugin_dir,
             f"0.{plugin_dir}", stream]
    return "/".join(x for x in parts if x)


def _s3_url(cmd: Command, inv: Invocation, stream: str) -> str:
    if not cmd.output_s3_bucket_name or inv.start is None:
        return ""
    return (f"https://s3.{cmd.output_s3_region or cmd.region}.amazonaws.com/"
            f"{cmd.output_s3_bucket_name}/{_s3_key(cmd, inv, stream)}")


def _upload_output(cmd: Command, inv: Invocation) -> None:
    """Best effort, like the agent: full stdout/stderr to the command's S3 bucket."""
    try:
        from moto.s3.models import s3_backends

        lock = BACKEND_LOCK or threading.RLock()
        with lock:
            be = s3_backends[cmd.account]["aws"]
            for stream, text in (("stdout", inv.stdout), ("stderr", inv.stderr)):
                if text:
                    be.put_object(cmd.output_s3_bucket_name, _s3_key(cmd, inv, stream), text.encode())
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# the other Run Command operations
# --------------------------------------------------------------------------------------------


def _command(command_id: Any) -> Command:
    _check_command_id(command_id)
    cmd = COMMANDS.get(command_id)
    if cmd is None:
        raise SsmError("InvalidCommandId", "The specified command ID isn't valid.")
    return cmd


def _plugin_api(cmd: Command, inv: Invocation) -> dict[str, Any]:
    plugin: dict[str, Any] = {
        "Name": cmd.plugin_name,
        "Status": inv.status if inv.details != "Undeliverable" else "Failed",
        "StatusDetails": inv.details,
        "ResponseCode": inv.response_code,
        "Output": _plugin_output(inv.stdout, inv.stderr) if inv.terminal else "",
        "StandardOutputUrl": _s3_url(cmd, inv, "stdout"),
        "StandardErrorUrl": _s3_url(cmd, inv, "stderr"),
        "OutputS3Region": cmd.output_s3_region,
        "OutputS3BucketName": cmd.output_s3_bucket_name,
        "OutputS3KeyPrefix": cmd.output_s3_key_prefix,
    }
    if inv.start is not None:
        plugin["ResponseStartDateTime"] = _epoch(inv.start)
    if inv.end is not None:
        plugin["ResponseFinishDateTime"] = _epoch(inv.end)
    return plugin


def _invocation_api(cmd: Command, inv: Invocation, details: bool) -> dict[str, Any]:
    return {
        "CommandId": cmd.command_id,
        "InstanceId": inv.instance_id,
        "InstanceName": inv.instance_name,
        "Comment": cmd.comment,
        "DocumentName": cmd.document_name,
        "DocumentVersion": cmd.document_version,
        "RequestedDateTime": _epoch(cmd.requested),
        "Status": inv.status,
        "StatusDetails": inv.details,
        "TraceOutput": "",
        "StandardOutputUrl": _s3_url(cmd, inv, "stdout"),
        "StandardErrorUrl": _s3_url(cmd, inv, "stderr"),
        "CommandPlugins": [_plugin_api(cmd, inv)] if details else [],
        "ServiceRole": cmd.service_role,
        "NotificationConfig": cmd.notification_config,
        "CloudWatchOutputConfig": cmd.cloudwatch_output_config,
    }


def _command_filters(filters: Any, invocations: bool) -> list[Any]:
    allowed = ("InvokedAfter", "InvokedBefore", "Status", "DocumentName") + (
        () if invocations else ("ExecutionStage",))
    out = []
    for f in filters or []:
        key, value = f.get("key"), f.get("value")
        if key not in allowed:
            raise SsmError("InvalidFilterKey", f"The filter key {key} is not valid.")
        if not isinstance(value, str) or not value:
            raise SsmError("InvalidFilterValue", f"The filter value {value} is not valid.")
        out.append((key, value if key not in ("InvokedAfter", "InvokedBefore") else _parse_time(value)))
    return out


def list_command_invocations(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    instance_id = p.get("InstanceId")
    if instance_id is not None:
        _check_instance_id(instance_id, "instanceId")
    filters = _command_filters(p.get("Filters"), invocations=True)
    with _LOCK:
        if p.get("CommandId") is not None:
            commands = [_command(p.get("CommandId"))]
        else:
            commands = [c for c in reversed(list(COMMANDS.values()))
                        if c.account == account and c.region == region]
        rows = []
        for cmd in commands:
            for inv in cmd.invocations.values():
                if instance_id and inv.instance_id != instance_id:
                    continue
                if not _matches(filters, cmd, inv.status, inv.details):
                    continue
                rows.append(_invocation_api(cmd, inv, bool(p.get("Details"))))
    page, nxt = _paginate(rows, p, 50, 1, 50)
    out: dict[str, Any] = {"CommandInvocations": page}
    if nxt:
        out["NextToken"] = nxt
    return out


def _matches(filters: list[Any], cmd: Command, status: str, details: str) -> bool:
    for key, value in filters:
        if key == "InvokedAfter" and cmd.requested < value:
            return False
        if key == "InvokedBefore" and cmd.requested > value:
            return False
        if key == "Status" and value not in (status, details):
            return False
        if key == "DocumentName" and cmd.document_name != value:
            return False
        if key == "ExecutionStage":
            complete = status not in ("Pending", "InProgress", "Cancelling")
            if (value == "Complete") != complete:
                return False
    return True


def list_commands(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    instance_id = p.get("InstanceId")
    if instance_id is not None:
        _check_instance_id(instance_id, "instanceId")
    filters = _command_filters(p.get("Filters"), invocations=False)
    with _LOCK:
        if p.get("CommandId") is not None:
            commands = [_command(p.get("CommandId"))]
        else:
            commands = [c for c in reversed(list(COMMANDS.values()))
                        if c.account == account and c.region == region]
        rows = []
        for cmd in commands:
            if instance_id and instance_id not in cmd.invocations:
                continue
            api = cmd.to_api()
            if _matches(filters, cmd, api["Status"], api["StatusDetails"]):
                rows.append(api)
    page, nxt = _paginate(rows, p, 50, 1, 50)
    out: dict[str, Any] = {"Commands": page}
    if nxt:
        out["NextToken"] = nxt
    return out


def get_command_invocation(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    command_id, instance_id = p.get("CommandId"), p.get("InstanceId")
    if command_id is None:
        raise _validation("1 validation error detected: Value null at 'commandId' failed to "
                          "satisfy constraint: Member must not be null")
    if instance_id is None:
        raise _validation("1 validation error detected: Value null at 'instanceId' failed to "
                          "satisfy constraint: Member must not be null")
    _check_command_id(command_id)
    _check_instance_id(instance_id, "instanceId")
    plugin_name = p.get("PluginName")
    with _LOCK:
        cmd = COMMANDS.get(command_id)
        inv = cmd.invocations.get(instance_id) if cmd is not None else None
        if inv is None:
            raise SsmError("InvocationDoesNotExist", "An error occurred (InvocationDoesNotExist) "
                           "when calling the GetCommandInvocation operation")
        if plugin_name is not None and plugin_name != cmd.plugin_name:
            raise SsmError("InvalidPluginName", "The plugin name isn't valid.")
        done = inv.terminal and inv.details != "Undeliverable"
        elapsed = ""
        if inv.start is not None:
            elapsed = f"PT{max(0.0, (inv.end or time.time()) - inv.start):.3f}S"
        return {
            "CommandId": cmd.command_id,
            "InstanceId": inv.instance_id,
            "Comment": cmd.comment,
            "DocumentName": cmd.document_name,
            "DocumentVersion": cmd.document_version,
            "PluginName": cmd.plugin_name,
            "ResponseCode": inv.response_code,
            "ExecutionStartDateTime": _iso(inv.start),
            "ExecutionElapsedTime": elapsed,
            "ExecutionEndDateTime": _iso(inv.end),
            "Status": inv.status,
            "StatusDetails": inv.details,
            "StandardOutputContent": _prefix(inv.stdout, MAX_STDOUT) if done else "",
            "StandardOutputUrl": _s3_url(cmd, inv, "stdout"),
            "StandardErrorContent": inv.stderr[:MAX_STDERR] if done else "",
            "StandardErrorUrl": _s3_url(cmd, inv, "stderr"),
            "CloudWatchOutputConfig": cmd.cloudwatch_output_config,
        }


def cancel_command(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    if p.get("CommandId") is None:
        raise _validation("1 validation error detected: Value null at 'commandId' failed to "
                          "satisfy constraint: Member must not be null")
    requested = p.get("InstanceIds")
    if requested is not None and len(requested) > 50:
        raise _validation("1 validation error detected: Value at 'instanceIds' failed to "
                          "satisfy constraint: Member must have length less than or equal to 50")
    with _LOCK:
        cmd = _command(p.get("CommandId"))
        ids = list(dict.fromkeys(requested)) if requested else list(cmd.invocations)
        for iid in ids:
            if iid not in cmd.invocations:
                raise SsmError("InvalidInstanceId", f"Instance {iid} is not part of command "
                               f"{cmd.command_id}.")
        cmd.cancelled = True
        if set(ids) == set(cmd.invocations):
            cmd.cancelled_all = True
        hit = []
        now = time.time()
        for iid in ids:
            inv = cmd.invocations[iid]
            if inv.terminal:
                continue
            hit.append(iid)
            inv.cancel_requested = True
            if inv.status == "Pending":  # not started yet: cancelled at once
                inv.status, inv.details = CANCELLED
                inv.end = now
            elif inv.proc is not None:
                _kill(inv.proc)
        CANCELS.append({
            "command_id": cmd.command_id,
            "instance_ids": list(requested) if requested else None,
            "cancelled": hit,
            "time": now,
        })
    return {}


_HANDLERS = {
    "DescribeInstanceInformation": describe_instance_information,
    "SendCommand": send_command,
    "ListCommands": list_commands,
    "ListCommandInvocations": list_command_invocations,
    "GetCommandInvocation": get_command_invocation,
    "CancelCommand": cancel_command,
}


# --------------------------------------------------------------------------------------------
# sandbox and reaper
# --------------------------------------------------------------------------------------------

_REAPER_CODE = r"""
import os, shutil, signal, sys
groups, dirs = set(), []
for line in sys.stdin:
    kind, value = line[:1], line[1:].rstrip("\n")
    if kind == "+":
        groups.add(int(value))
    elif kind == "-":
        groups.discard(int(value))
    elif kind == "d":
        dirs.append(value)
for g in groups:
    try:
        os.killpg(g, signal.SIGKILL)
    except OSError:
        pass
for d in dirs:
    shutil.rmtree(d, ignore_errors=True)
"""
_REAPER: subprocess.Popen | None = None
_REAPER_LOCK = threading.Lock()
_GROUPS: set[int] = set()
_OWNED_DIRS: list[str] = []


def _reaper_send(line: str) -> None:
    """Tell the reaper (started on first use) about a process group or a directory."""
    global _REAPER
    with _REAPER_LOCK:
        try:
            if _REAPER is None or _REAPER.poll() is not None:
                _REAPER = subprocess.Popen(
                    [sys.executable, "-c", _REAPER_CODE], stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                )
                state = [f"+{g}" for g in _GROUPS] + [f"d{d}" for d in _OWNED_DIRS]
                for s in state:
                    if s != line:
                        _REAPER.stdin.write((s + "\n").encode())
            _REAPER.stdin.write((line + "\n").encode())
            _REAPER.stdin.flush()
        except Exception:
            pass


def _track_group(pgid: int) -> None:
    with _REAPER_LOCK:
        _GROUPS.add(pgid)
    _reaper_send(f"+{pgid}")


def _untrack_group_if_empty(pgid: int) -> None:
    try:
        os.killpg(pgid, 0)
        return  # background children are still running in the group: keep it
    except OSError:
        pass
    with _REAPER_LOCK:
        _GROUPS.discard(pgid)
    _reaper_send(f"-{pgid}")


def _kill_all_groups() -> None:
    with _REAPER_LOCK:
        groups = list(_GROUPS)
        _GROUPS.clear()
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except OSError:
            pass
        _reaper_send(f"-{g}")


def sandbox_base() -> str:
    global _SANDBOX
    with _LOCK:
        if _SANDBOX is None:
            configured = os.environ.get("EMULATOR_SSM_SANDBOX")
            if configured:
                _SANDBOX = os.path.abspath(configured)
                os.makedirs(_SANDBOX, exist_ok=True)
            else:
                _SANDBOX = tempfile.mkdtemp(prefix="emulator-ssm-")
                with _REAPER_LOCK:
                    _OWNED_DIRS.append(_SANDBOX)
                _reaper_send(f"d{_SANDBOX}")
        return _SANDBOX


def _sandbox_dir(instance_id: str) -> str:
    path = os.path.join(sandbox_base(), instance_id)
    os.makedirs(path, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# entry points used by emulator.py
# --------------------------------------------------------------------------------------------


def _reply(status: int, payload: Any) -> tuple[str, list[tuple[str, str]], bytes]:
    body = json.dumps(payload, separators=(",", ":")).encode()
    reason = {200: "OK", 400: "Bad Request", 500: "Internal Server Error"}.get(status, "Error")
    headers = [("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-RequestId", str(uuid.uuid4())),
               ("Content-Length", str(len(body)))]
    return f"{status} {reason}", headers, body


def dispatch(environ: dict[str, Any], body: bytes) -> tuple[str, list[tuple[str, str]], bytes] | None:
    """Answer a Run Command request, or None for the SSM operations moto keeps."""
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if not target.startswith(TARGET_PREFIX):
        return None
    handler = _HANDLERS.get(target[len(TARGET_PREFIX):])
    if handler is None:
        return None
    try:
        params = json.loads(body or b"{}")
        if not isinstance(params, dict):
            raise ValueError
    except ValueError:
        return _reply(400, {"__type": "SerializationException", "message": "Malformed JSON body"})
    account, region = _scope(environ)
    try:
        return _reply(200, handler(params, account, region))
    except SsmError as exc:
        return _reply(exc.status, {"__type": exc.code, "message": exc.message})
    except (TypeError, ValueError, AttributeError) as exc:
        return _reply(400, {"__type": "ValidationException", "message": f"Invalid request: {exc}"})


def snapshot() -> dict[str, Any]:
    with _LOCK:
        commands = []
        for cmd in COMMANDS.values():
            status, details, *_ = cmd.aggregate()
            commands.append({
                "command_id": cmd.command_id,
                "document": cmd.document_name,
                "instance_ids": list(cmd.invocations),
                "parameters": cmd.parameters,
                "comment": cmd.comment,
                "requested": cmd.requested,
                "status": status,
                "status_details": details,
                "cancelled": cmd.cancelled,
                "invocations": {
                    iid: {
                        "status": inv.status,
                        "status_details": inv.details,
                        "response_code": inv.response_code,
                        "stdout": inv.stdout,
                        "stderr": inv.stderr,
                        "start": inv.start,
                        "end": inv.end,
                    }
                    for iid, inv in cmd.invocations.items()
                },
            })
        return {
            "commands": commands,
            "cancels": list(CANCELS),
            "sandbox": sandbox_base(),
            **_config(),
        }


def _config() -> dict[str, Any]:
    return {
        "online_delay_seconds": CONFIG["online_delay_seconds"],
        "never_online": sorted(NEVER_ONLINE),
        "instances": {k: dict(v) for k, v in RUNNERS.items()},
    }


def _string_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"{what} must be a list of strings")
    return value


def control(method: str, path: str, body: bytes) -> tuple[str, Any] | None:
    """The /_emulator/ssm endpoints; None for other paths."""
    if path != "/_emulator/ssm" and not path.startswith("/_emulator/ssm/"):
        return None
    try:
        spec = json.loads(body or b"{}") if method == "POST" else {}
        if not isinstance(spec, dict):
            raise ValueError("body must be a JSON object")
        with _LOCK:
            if path == "/_emulator/ssm":
                if method == "GET":
                    return "200 OK", snapshot()
                if method == "POST":
                    if "online_delay_seconds" in spec:
                        delay = float(spec["online_delay_seconds"])
                        if delay < 0 or math.isnan(delay):
                            raise ValueError("online_delay_seconds must be >= 0")
                        CONFIG["online_delay_seconds"] = delay
                    if spec.get("never_online") is not None:
                        NEVER_ONLINE.update(_string_list(spec["never_online"], "never_online"))
                    if spec.get("online") is not None:
                        NEVER_ONLINE.difference_update(_string_list(spec["online"], "online"))
                    return "200 OK", _config()
            prefix = "/_emulator/ssm/instances/"
            if path.startswith(prefix) and "/" not in path[len(prefix):] and path[len(prefix):]:
                iid = path[len(prefix):]
                if method == "GET":
                    return "200 OK", {"instance_id": iid, **RUNNERS.get(iid, {})}
                if method == "DELETE":
                    RUNNERS.pop(iid, None)
                    return "200 OK", {"instance_id": iid}
                if method == "POST":
                    runner = dict(RUNNERS.get(iid, {}))
                    for key, value in spec.items():
                        if key not in ("prefix", "cwd", "env", "pickup_seconds"):
                            raise ValueError(f"unknown key {key!r} (use prefix, cwd, env, pickup_seconds)")
                        if value is None:
                            runner.pop(key, None)
                        elif key == "pickup_seconds":
                            pickup = float(value)
                            if not 0 <= pickup <= 60:
                                raise ValueError("pickup_seconds must be within 0..60")
                            runner["pickup_seconds"] = pickup
                        elif key == "prefix":
                            runner["prefix"] = _string_list(value, "prefix")
                        elif key == "cwd":
                            if not isinstance(value, str):
                                raise ValueError("cwd must be a string")
                            runner["cwd"] = value
                        else:
                            if not isinstance(value, dict):
                                raise ValueError("env must be an object")
                            runner["env"] = {str(k): str(v) for k, v in value.items()}
                    RUNNERS[iid] = runner
                    return "200 OK", {"instance_id": iid, **runner}
    except (ValueError, TypeError) as exc:
        return "400 Bad Request", {"error": str(exc)}
    return "404 Not Found", {"error": f"no such endpoint: {method} {path}"}


def reset() -> None:
    """POST /moto-api/reset: forget commands and settings, kill what still runs."""
    global _GENERATION
    with _LOCK:
        _GENERATION += 1
        for cmd in COMMANDS.values():
            for inv in cmd.invocations.values():
                if inv.proc is not None:
                    _kill(inv.proc)
        COMMANDS.clear()
        CANCELS.clear()
        NEVER_ONLINE.clear()
        RUNNERS.clear()
        CONFIG["online_delay_seconds"] = 0.0
    _kill_all_groups()

"""OpsWorks Stacks, in memory, for the emulator (emulator.py routes requests here).

moto dropped OpsWorks in 5.1.12; this module answers ``OpsWorks_20130218.<Op>`` (AWS JSON 1.1)
for the operations that register existing instances with a stack:

    CreateStack, DescribeStacks, CreateLayer, DescribeLayers, GetHostnameSuggestion,
    RegisterInstance, DescribeInstances, AssignInstance, UnassignInstance, DeregisterInstance,
    DescribeCommands

Registered instance lifecycle (statuses as DescribeInstances shows them):
    RegisterInstance            -> "registering", "registered" after register_delay_seconds
    AssignInstance (registered) -> "running_setup", then "online" after online_delay_seconds,
                                   or "setup_failed" when its EC2 instance is in fail_setup
    UnassignInstance            -> "registered" (a shutdown command is recorded)
    DeregisterInstance          -> gone
The EC2 instance ID comes from InstanceIdentity.Document ("instanceId"), as with AWS; a
registration without an identity is an on-premises one (no Ec2InstanceId).

Control endpoints (JSON), served through ``control()``:
    GET  /_emulator/opsworks   {"stacks": [...], "layers": [...], "instances": [...],
                                "commands": [...], "register_calls": {"i-...": n},
                                "register_calls_by_hostname": {...}, "config": {...},
                                "describe_all_stacks_calls": n}  (DescribeStacks without StackIds)
                               (stacks/layers/instances/commands shaped as the Describe* calls)
    POST /_emulator/opsworks   {"register_delay_seconds": 1, "online_delay_seconds": 1,
                                "fail_setup": ["i-..."],       (added to the set)
                                "succeed_setup": ["i-..."]}    (removed from it)
"""

from __future__ import annotations

import datetime
import json
import math
import re
import threading
import time
import uuid
from collections import Counter
from typing import Any

TARGET_PREFIX = "OpsWorks_20130218."
from aws_scope import DEFAULT_ACCOUNT, DEFAULT_REGION  # noqa: E402,F401
from aws_scope import scope as _scope  # noqa: E402
LAYER_TYPES = ("aws-flow-ruby", "ecs-cluster", "java-app", "lb", "web", "php-app", "rails-app",
               "nodejs-app", "memcached", "db-master", "monitoring-master", "custom")
SHORTNAME_RE = re.compile(r"^[a-zA-Z0-9_.\-]{1,32}$")

_LOCK = threading.RLock()
CONFIG: dict[str, float] = {"register_delay_seconds": 1.0, "online_delay_seconds": 1.0}
FAIL_SETUP: set[str] = set()
STACKS: dict[str, dict[str, Any]] = {}
LAYERS: dict[str, dict[str, Any]] = {}
INSTANCES: dict[str, dict[str, Any]] = {}
COMMANDS: dict[str, dict[str, Any]] = {}
REGISTER_CALLS: Counter = Counter()
# DescribeStacks calls without StackIds (every stack listed): what AWS refuses to a policy
# scoped to stack ARNs.
DESCRIBE_ALL_STACKS: Counter = Counter()
REGISTER_CALLS_BY_HOSTNAME: Counter = Counter()
_HOSTNAME_COUNTERS: Counter = Counter()


class OpsWorksError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(message: str) -> OpsWorksError:
    return OpsWorksError("ValidationException", message)


def _not_found(message: str) -> OpsWorksError:
    return OpsWorksError("ResourceNotFoundException", message)


def _required(p: dict[str, Any], name: str, kind: type = str) -> Any:
    value = p.get(name)
    if value is None or (kind is str and value == ""):
        field = name[0].lower() + name[1:]
        raise _invalid(f"1 validation error detected: Value null at '{field}' failed to satisfy "
                       "constraint: Member must not be null")
    if not isinstance(value, kind):
        raise _invalid(f"Invalid value for {name}")
    return value


def _created_at(t: float) -> str:
    """OpsWorks' timestamp strings: 2013-02-18T22:49:33+00:00."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")


# --------------------------------------------------------------------------------------------
# stacks and layers
# --------------------------------------------------------------------------------------------


def _stack(stack_id: Any) -> dict[str, Any]:
    stack = STACKS.get(stack_id) if isinstance(stack_id, str) else None
    if stack is None:
        raise _not_found(f"Unable to find stack with ID {stack_id}")
    return stack


def _layer(layer_id: Any) -> dict[str, Any]:
    layer = LAYERS.get(layer_id) if isinstance(layer_id, str) else None
    if layer is None:
        raise _not_found(f"Unable to find layer with ID {layer_id}")
    return layer


def _instance(instance_id: Any) -> dict[str, Any]:
    inst = INSTANCES.get(instance_id) if isinstance(instance_id, str) else None
    if inst is None:
        raise _not_found(f"Unable to find instance with ID {instance_id}")
    return inst


def create_stack(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    name = _required(p, "Name")
    stack_region = _required(p, "Region")
    service_role = _required(p, "ServiceRoleArn")
    profile = _required(p, "DefaultInstanceProfileArn")
    if len(name) > 64:
        raise _invalid("Stack names can be a maximum of 64 characters.")
    if p.get("DefaultSubnetId") and not p.get("VpcId"):
        pass  # AWS infers the VPC from the subnet
    stack_id = str(uuid.uuid4())
    attributes = {"Color": None}
    attributes.update(p.get("Attributes") or {})
    stack = {
        "StackId": stack_id,
        "Name": name,
        "Arn": f"arn:aws:opsworks:{stack_region}:{account}:stack/{stack_id}/",
        "Region": stack_region,
        "Attributes": attributes,
        "ServiceRoleArn": service_role,
        "DefaultInstanceProfileArn": profile,
        "DefaultOs": p.get("DefaultOs") or "Amazon Linux 2",
        "HostnameTheme": p.get("HostnameTheme") or "Layer_Dependent",
        "DefaultAvailabilityZone": p.get("DefaultAvailabilityZone") or f"{stack_region}a",
        "ConfigurationManager": p.get("ConfigurationManager") or {"Name": "Chef", "Version": "12"},
        "ChefConfiguration": p.get("ChefConfiguration") or {"ManageBerkshelf": False},
        "UseCustomCookbooks": bool(p.get("UseCustomCookbooks", False)),
        "UseOpsworksSecurityGroups": bool(p.get("UseOpsworksSecurityGroups", True)),
        "CustomCookbooksSource": p.get("CustomCookbooksSource") or {},
        "DefaultRootDeviceType": p.get("DefaultRootDeviceType") or "ebs",
        "AgentVersion": p.get("AgentVersion") or "LATEST",
        "CreatedAt": _created_at(time.time()),
    }
    for key in ("VpcId", "DefaultSubnetId", "CustomJson", "DefaultSshKeyName"):
        if p.get(key) is not None:
            stack[key] = p[key]
    STACKS[stack_id] = stack
    return {"StackId": stack_id}


def describe_stacks(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    ids = p.get("StackIds")
    if ids is None:
        DESCRIBE_ALL_STACKS["calls"] += 1
        return {"Stacks": list(STACKS.values())}
    if not isinstance(ids, list) or not ids:
        raise _invalid("Please provide no arguments or, one or more stack IDs")
    return {"Stacks": [_stack(i) for i in ids]}


def create_layer(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    stack = _stack(_required(p, "StackId"))
    layer_type = _required(p, "Type")
    name = _required(p, "Name")
    shortname = _required(p, "Shortname")
    if layer_type not in LAYER_TYPES:
        raise _invalid(
            f"1 validation error detected: Value '{layer_type}' at 'type' failed to satisfy "
            f"constraint: Member must satisfy enum value set: [{', '.join(LAYER_TYPES)}]"
        )
    if len(name) > 32:
        raise _invalid("Layer names can be a maximum of 32 characters.")
    if not SHORTNAME_RE.match(shortname):
        raise _invalid(f"Invalid shortname {shortname}: it can have a maximum of 32 characters, "
                       "limited to alphanumeric characters, '-', '_' and '.'")
    siblings = [la for la in LAYERS.values() if la["StackId"] == stack["StackId"]]
    if layer_type != "custom" and any(la["Type"] == layer_type for la in siblings):
        raise _invalid(f"There is already a layer of type {layer_type} in this stack")
    if any(la["Shortname"] == shortname for la in siblings):
        raise _invalid(f"There is already a layer with shortname {shortname} in this stack")
    if any(la["Name"] == name for la in siblings):
        raise _invalid(f"There is already a layer named {name} in this stack")
    layer_id = str(uuid.uuid4())
    no_recipes = {"Setup": [], "Configure": [], "Deploy": [], "Undeploy": [], "Shutdown": []}
    layer = {
        "Arn": f"arn:aws:opsworks:{stack['Region']}:{account}:layer/{layer_id}",
        "StackId": stack["StackId"],
        "LayerId": layer_id,
        "Type": layer_type,
        "Name": name,
        "Shortname": shortname,
        "Attributes": p.get("Attributes") or {},
        "CustomSecurityGroupIds": p.get("CustomSecurityGroupIds") or [],
        "DefaultSecurityGroupNames": [f"AWS-OpsWorks-{'Custom-Server' if layer_type == 'custom' else layer_type}"],
        "Packages": p.get("Packages") or [],
        "VolumeConfigurations": p.get("VolumeConfigurations") or [],
        "EnableAutoHealing": bool(p.get("EnableAutoHealing", True)),
        "AutoAssignElasticIps": bool(p.get("AutoAssignElasticIps", False)),
        "AutoAssignPublicIps": bool(p.get("AutoAssignPublicIps", True)),
        "DefaultRecipes": dict(no_recipes),
        "CustomRecipes": {**no_recipes, **(p.get("CustomRecipes") or {})},
        "CreatedAt": _created_at(time.time()),
        "InstallUpdatesOnBoot": bool(p.get("InstallUpdatesOnBoot", True)),
        "UseEbsOptimizedInstances": bool(p.get("UseEbsOptimizedInstances", False)),
        "LifecycleEventConfiguration": p.get("LifecycleEventConfiguration") or {
            "Shutdown": {"ExecutionTimeout": 120, "DelayUntilElbConnectionsDrained": False}
        },
    }
    for key in ("CustomInstanceProfileArn", "CustomJson", "CloudWatchLogsConfiguration"):
        if p.get(key) is not None:
            layer[key] = p[key]
    LAYERS[layer_id] = layer
    return {"LayerId": layer_id}


def describe_layers(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    stack_id, layer_ids = p.get("StackId"), p.get("LayerIds")
    if (stack_id is None) == (layer_ids is None) or (layer_ids is not None and not layer_ids):
        raise _invalid("Please provide one or more layer IDs or a stack ID")
    if stack_id is not None:
        _stack(stack_id)
        return {"Layers": [la for la in LAYERS.values() if la["StackId"] == stack_id]}
    return {"Layers": [_layer(i) for i in layer_ids]}


def get_hostname_suggestion(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    layer = _layer(_required(p, "LayerId"))
    base = re.sub(r"[^a-z0-9-]", "-", layer["Shortname"].lower()).strip("-") or "host"
    in_use = {i["Hostname"] for i in INSTANCES.values() if i["StackId"] == layer["StackId"]}
    while True:
        _HOSTNAME_COUNTERS[layer["LayerId"]] += 1
        hostname = f"{base}{_HOSTNAME_COUNTERS[layer['LayerId']]}"
        if hostname not in in_use:
            return {"LayerId": layer["LayerId"], "Hostname": hostname}


# --------------------------------------------------------------------------------------------
# instances
# --------------------------------------------------------------------------------------------


def _ec2_instance(account: str, region: str, instance_id: str) -> Any:
    try:
        from moto.ec2.models import ec2_backends

        for r in ec2_backends[account][region].all_reservations():
            for i in r.instances:
                if i.id == instance_id:
                    return i
    except Exception:
        pass
    return None


def _status(inst: dict[str, Any], now: float) -> str:
    """The lifecycle status, advanced lazily from the recorded deadlines."""
    if inst["_setup_deadline"] is None:
        return "registering" if now < inst["_registered_at"] else "registered"
    if now < inst["_setup_deadline"]:
        return "running_setup"
    if inst["_setup_result"] is None:  # decided once, when setup finishes
        failed = inst.get("Ec2InstanceId") in FAIL_SETUP
        inst["_setup_result"] = "setup_failed" if failed else "online"
        command = COMMANDS.get(inst["_setup_command"])
        if command is not None:
            command["Status"] = "failed" if failed else "successful"
            command["ExitCode"] = 1 if failed else 0
            command["CompletedAt"] = _created_at(inst["_setup_deadline"])
    return inst["_setup_result"]


def _instance_api(inst: dict[str, Any], now: float) -> dict[str, Any]:
    out = {k: v for k, v in inst.items() if not k.startswith("_")}
    out["Status"] = _status(inst, now)
    out["LayerIds"] = list(inst["LayerIds"])
    if out["Status"] != "registering":
        out["ReportedAgentVersion"] = "4039-20200430042739"
        out["ReportedOs"] = {"Family": "redhat", "Name": "amazon", "Version": "2023"}
    return out


def register_instance(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    stack = _stack(_required(p, "StackId"))
    identity = p.get("InstanceIdentity")
    ec2_id = None
    document: dict[str, Any] = {}
    if identity is not None:
        if not isinstance(identity, dict) or not identity.get("Document"):
            raise _invalid("InstanceIdentity must contain the instance identity Document")
        try:
            document = json.loads(identity["Document"])
            ec2_id = document["instanceId"]
            if not isinstance(ec2_id, str) or not ec2_id:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise _invalid("Invalid instance identity document: it must be the JSON identity "
                           "document of an EC2 instance, with an instanceId")
    hostname = p.get("Hostname")
    if ec2_id is not None:
        REGISTER_CALLS[ec2_id] += 1
    if hostname:
        REGISTER_CALLS_BY_HOSTNAME[hostname] += 1
    if ec2_id is None and not hostname:
        raise _invalid("Please provide a hostname or an instance identity")
    if ec2_id is not None:
        for other in INSTANCES.values():
            if other.get("Ec2InstanceId") == ec2_id:
                raise _invalid(f"EC2 instance {ec2_id} is already registered with stack "
                               f"{other['StackId']} as instance {other['InstanceId']}")
    ec2 = _ec2_instance(account, document.get("region") or region, ec2_id) if ec2_id else None
    private_ip = p.get("PrivateIp") or document.get("privateIp") or (ec2.private_ip if ec2 else None)
    public_ip = p.get("PublicIp") or (getattr(ec2, "public_ip", None) if ec2 else None)
    if not hostname:
        hostname = (ec2.private_dns_name.split(".")[0] if ec2 is not None
                    else f"ip-{private_ip.replace('.', '-')}" if private_ip else ec2_id)
    if len(hostname) > 63:
        raise _invalid("Linux-based instance host names can have a maximum of 63 characters")
    for other in INSTANCES.values():
        if other["StackId"] == stack["StackId"] and other["Hostname"] == hostname:
            raise _invalid(f"Hostname {hostname} is already in use in stack {stack['StackId']}")
    now = time.time()
    instance_id = str(uuid.uuid4())
    inst: dict[str, Any] = {
        "InstanceId": instance_id,
        "Arn": f"arn:aws:opsworks:{stack['Region']}:{account}:instance/{instance_id}",
        "StackId": stack["StackId"],
        "Hostname": hostname,
        "LayerIds": [],
        "InfrastructureClass": "ec2" if ec2_id else "on-premises",
        "RegisteredBy": f"arn:aws:iam::{account}:user/moto",
        "AgentVersion": "INHERIT",
        "Os": "Custom",
        "Architecture": "x86_64",
        "RootDeviceType": "ebs",
        "CreatedAt": _created_at(now),
        "_registered_at": now + float(CONFIG["register_delay_seconds"]),
        "_setup_deadline": None,
        "_setup_result": None,
        "_setup_command": None,
    }
    if ec2_id:
        inst["Ec2InstanceId"] = ec2_id
    if private_ip:
        inst["PrivateIp"] = private_ip
    if public_ip:
        inst["PublicIp"] = public_ip
    if ec2 is not None:
        inst["InstanceType"] = getattr(ec2, "instance_type", None) or document.get("instanceType")
        inst["PrivateDns"] = ec2.private_dns_name
        zone = getattr(getattr(ec2, "placement", None), "zone", None)
        if zone:
            inst["AvailabilityZone"] = zone
        if getattr(ec2, "subnet_id", None):
            inst["SubnetId"] = ec2.subnet_id
    elif document.get("instanceType"):
        inst["InstanceType"] = document["instanceType"]
    if p.get("RsaPublicKeyFingerprint"):
        inst["SshHostRsaKeyFingerprint"] = p["RsaPublicKeyFingerprint"]
    inst = {k: v for k, v in inst.items() if v is not None or k.startswith("_")}
    INSTANCES[instance_id] = inst
    return {"InstanceId": instance_id}


def describe_instances(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    stack_id, layer_id, ids = p.get("StackId"), p.get("LayerId"), p.get("InstanceIds")
    given = [x for x in (stack_id, layer_id, ids) if x is not None]
    if len(given) != 1 or (ids is not None and not ids):
        raise _invalid("Please provide either one or more instance IDs or one stack ID or one layer ID")
    now = time.time()
    if stack_id is not None:
        _stack(stack_id)
        rows = [i for i in INSTANCES.values() if i["StackId"] == stack_id]
    elif layer_id is not None:
        _layer(layer_id)
        rows = [i for i in INSTANCES.values() if layer_id in i["LayerIds"]]
    else:
        rows = [_instance(i) for i in ids]
    return {"Instances": [_instance_api(i, now) for i in rows]}


def assign_instance(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    inst = _instance(_required(p, "InstanceId"))
    layer_ids = _required(p, "LayerIds", list)
    if not layer_ids:
        raise _invalid("Please provide at least one layer ID")
    layers = [_layer(i) for i in layer_ids]
    for layer in layers:
        if layer["StackId"] != inst["StackId"]:
            raise _invalid(f"Layer {layer['LayerId']} does not belong to the stack of instance "
                           f"{inst['InstanceId']}")
        if inst.get("Ec2InstanceId") and layer["Type"] != "custom":
            raise _invalid("You can assign registered Amazon EC2 instances only to custom layers")
    now = time.time()
    status = _status(inst, now)
    if inst["LayerIds"] or inst["_setup_deadline"] is not None:
        raise _invalid(f"Instance {inst['InstanceId']} is already assigned to a layer; "
                       "unassign it first")
    if status != "registered":
        raise _invalid(f"Instance {inst['InstanceId']} must be registered before it can be "
                       f"assigned to a layer (status: {status})")
    inst["LayerIds"] = list(dict.fromkeys(layer_ids))
    inst["_setup_deadline"] = now + float(CONFIG["online_delay_seconds"])
    inst["_setup_result"] = None
    inst["_setup_command"] = _record_command(inst, "setup", now, pending=True)
    return {}


def unassign_instance(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    inst = _instance(_required(p, "InstanceId"))
    if not inst["LayerIds"]:
        raise _invalid(f"Instance {inst['InstanceId']} is not assigned to any layer")
    now = time.time()
    _status(inst, now)  # settle the setup command first
    inst["LayerIds"] = []
    inst["_setup_deadline"] = None
    inst["_setup_result"] = None
    inst["_setup_command"] = None
    _record_command(inst, "shutdown", now, pending=False)
    return {}


def deregister_instance(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    inst = _instance(_required(p, "InstanceId"))
    _status(inst, time.time())
    del INSTANCES[inst["InstanceId"]]
    return {}


def _record_command(inst: dict[str, Any], kind: str, now: float, pending: bool) -> str:
    command_id = str(uuid.uuid4())
    command: dict[str, Any] = {
        "CommandId": command_id,
        "InstanceId": inst["InstanceId"],
        "CreatedAt": _created_at(now),
        "AcknowledgedAt": _created_at(now),
        "Status": "pending" if pending else "successful",
        "Type": kind,
    }
    if not pending:
        command["CompletedAt"] = _created_at(now)
        command["ExitCode"] = 0
    COMMANDS[command_id] = command
    return command_id


def describe_commands(p: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    deployment_id, instance_id, ids = p.get("DeploymentId"), p.get("InstanceId"), p.get("CommandIds")
    given = [x for x in (deployment_id, instance_id, ids) if x is not None]
    if len(given) != 1 or (ids is not None and not ids):
        raise _invalid("Please provide either one or more command IDs or one deployment ID or "
                       "one instance ID")
    now = time.time()
    for inst in INSTANCES.values():
        _status(inst, now)  # settles pending setup commands
    if deployment_id is not None:
        raise _not_found(f"Unable to find deployment with ID {deployment_id}")
    if instance_id is not None:
        _instance(instance_id)
        return {"Commands": [c for c in COMMANDS.values() if c["InstanceId"] == instance_id]}
    out = []
    for cid in ids:
        if cid not in COMMANDS:
            raise _not_found(f"Unable to find command with ID {cid}")
        out.append(COMMANDS[cid])
    return {"Commands": out}


_HANDLERS = {
    "CreateStack": create_stack,
    "DescribeStacks": describe_stacks,
    "CreateLayer": create_layer,
    "DescribeLayers": describe_layers,
    "GetHostnameSuggestion": get_hostname_suggestion,
    "RegisterInstance": register_instance,
    "DescribeInstances": describe_instances,
    "AssignInstance": assign_instance,
    "UnassignInstance": unassign_instance,
    "DeregisterInstance": deregister_instance,
    "DescribeCommands": describe_commands,
}


# --------------------------------------------------------------------------------------------
# entry points used by emulator.py
# --------------------------------------------------------------------------------------------


def _reply(status: int, payload: Any) -> tuple[str, list[tuple[str, str]], bytes]:
    body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
    reason = {200: "OK", 400: "Bad Request"}.get(status, "Error")
    headers = [("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-RequestId", str(uuid.uuid4())),
               ("Content-Length", str(len(body)))]
    return f"{status} {reason}", headers, body


def dispatch(environ: dict[str, Any], body: bytes) -> tuple[str, list[tuple[str, str]], bytes] | None:
    """Answer an OpsWorks Stacks request; None when the request is not one."""
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if not target.startswith(TARGET_PREFIX):
        return None
    op = target[len(TARGET_PREFIX):]
    handler = _HANDLERS.get(op)
    if handler is None:
        return _reply(400, {"__type": "UnknownOperationException",
                            "message": f"The emulator does not implement OpsWorks {op}"})
    try:
        params = json.loads(body or b"{}")
        if not isinstance(params, dict):
            raise ValueError
    except ValueError:
        return _reply(400, {"__type": "SerializationException", "message": "Malformed JSON body"})
    account, region = _scope(environ)
    try:
        with _LOCK:
            result = handler(params, account, region)
    except OpsWorksError as exc:
        return _reply(400, {"__type": exc.code, "message": exc.message})
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        return _reply(400, {"__type": "ValidationException", "message": f"Invalid request: {exc}"})
    # operations without output members answer an empty body, as AWS does
    return _reply(200, result if result else None)


def snapshot() -> dict[str, Any]:
    with _LOCK:
        now = time.time()
        instances = [_instance_api(i, now) for i in INSTANCES.values()]
        return {
            "stacks": list(STACKS.values()),
            "layers": list(LAYERS.values()),
            "instances": instances,
            "commands": list(COMMANDS.values()),
            "register_calls": dict(REGISTER_CALLS),
            "describe_all_stacks_calls": DESCRIBE_ALL_STACKS["calls"],
            "register_calls_by_hostname": dict(REGISTER_CALLS_BY_HOSTNAME),
            "config": _config(),
        }


def _config() -> dict[str, Any]:
    return {**CONFIG, "fail_setup": sorted(FAIL_SETUP)}


def control(method: str, path: str, body: bytes) -> tuple[str, Any] | None:
    """The /_emulator/opsworks endpoints; None for other paths."""
    if path != "/_emulator/opsworks":
        return None
    if method == "GET":
        return "200 OK", snapshot()
    if method != "POST":
        return "404 Not Found", {"error": f"no such endpoint: {method} {path}"}
    try:
        spec = json.loads(body or b"{}")
        if not isinstance(spec, dict):
            raise ValueError("body must be a JSON object")
        updates: dict[str, float] = {}
        for key in ("register_delay_seconds", "online_delay_seconds"):
            if spec.get(key) is not None:
                value = float(spec[key])
                if value < 0 or math.isnan(value):
                    raise ValueError(f"{key} must be >= 0")
                updates[key] = value
        lists = {}
        for key in ("fail_setup", "succeed_setup"):
            value = spec.get(key)
            if value is not None:
                if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                    raise ValueError(f"{key} must be a list of EC2 instance IDs")
                lists[key] = value
    except (ValueError, TypeError) as exc:
        return "400 Bad Request", {"error": str(exc)}
    with _LOCK:
        CONFIG.update(updates)
        FAIL_SETUP.update(lists.get("fail_setup", []))
        FAIL_SETUP.difference_update(lists.get("succeed_setup", []))
        return "200 OK", _config()


def reset() -> None:
    """POST /moto-api/reset."""
    with _LOCK:
        STACKS.clear()
        LAYERS.clear()
        INSTANCES.clear()
        COMMANDS.clear()
        REGISTER_CALLS.clear()
        DESCRIBE_ALL_STACKS.clear()
        REGISTER_CALLS_BY_HOSTNAME.clear()
        _HOSTNAME_COUNTERS.clear()
        FAIL_SETUP.clear()
        CONFIG.update(register_delay_seconds=1.0, online_delay_seconds=1.0)

"""ECS container instance draining for the emulator (emulator.py routes requests here).

moto keeps ECS clusters, container instances and tasks, but a DRAINING container instance
keeps its tasks forever, and ListContainerInstances ignores its `filter`. This module adds:

* ListContainerInstances with `filter` in the cluster query language's one form provision
  uses, `ec2InstanceId == i-...` (spaces optional); any other filter is refused with
  InvalidParameterException, so a test never mistakes an ignored filter for a match.
* Draining (after the ECS developer guide's "Container instance draining"): while a
  container instance is DRAINING, the service scheduler replaces its service tasks (those
  whose startedBy is `ecs-svc/...`) on ACTIVE container instances of the cluster, one task
  every DRAIN_STEP_SECONDS: the replacement is started on the ACTIVE instance with the
  fewest running tasks, then the old task is stopped. Without an ACTIVE instance the tasks
  stay (there is nowhere to put them). Standalone tasks (RunTask/StartTask without a
  service) are never moved, as in ECS. A background thread does the moving.

Control endpoint (JSON), served through ``control()``:
    GET /_emulator/ecs     {"moves": [{"cluster", "task", "replacement", "from", "to", "at"}]}
POST /moto-api/reset forgets the moves.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from typing import Any

DRAIN_STEP_SECONDS = 1.0
TICK_SECONDS = 0.2
TARGET_PREFIX = "AmazonEC2ContainerServiceV20141113."
from aws_scope import DEFAULT_ACCOUNT, DEFAULT_REGION  # noqa: E402,F401
from aws_scope import scope as _scope  # noqa: E402
_FILTER_RE = re.compile(r"^\s*ec2InstanceId\s*==\s*(i-[0-9a-f]{8,17})\s*$")

# emulator.py's lock around moto's backends (taken before _LOCK, never after).
BACKEND_LOCK: Any = None
_LOCK = threading.RLock()
MOVES: list[dict[str, Any]] = []
# container instance ARN -> when its last task moved (or when it was first seen draining)
_LAST_MOVE: dict[str, float] = {}
_TICKER: threading.Thread | None = None


def _error(code: str, message: str) -> tuple[str, list[tuple[str, str]], bytes]:
    payload = json.dumps({"__type": code, "message": message}).encode()
    return "400 Bad Request", [("Content-Type", "application/x-amz-json-1.1"),
                               ("x-amzn-RequestId", str(uuid.uuid4())),
                               ("Content-Length", str(len(payload)))], payload


def _list_with_filter(environ: dict[str, Any], params: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    from moto.ecs.models import ecs_backends

    m = _FILTER_RE.match(str(params.get("filter")))
    if m is None:
        return _error("InvalidParameterException",
                      "the emulator's ListContainerInstances understands only the filter 'ec2InstanceId == i-...'")
    account, region = _scope(environ)
    backend = ecs_backends[account][region]
    cluster = str(params.get("cluster") or "default").split("/")[-1]
    if cluster not in backend.clusters:
        return _error("ClusterNotFoundException", "Cluster not found.")
    status = params.get("status")
    arns = sorted(
        ci.container_instance_arn for ci in backend.container_instances.get(cluster, {}).values()
        if ci.ec2_instance_id == m.group(1) and (status is None or ci.status == status)
    )
    payload = json.dumps({"containerInstanceArns": arns}).encode()
    return "200 OK", [("Content-Type", "application/x-amz-json-1.1"),
                      ("x-amzn-RequestId", str(uuid.uuid4())),
                      ("Content-Length", str(len(payload)))], payload


def dispatch(environ: dict[str, Any], body: bytes) -> tuple[str, list[tuple[str, str]], bytes] | None:
    """Answer ListContainerInstances with a filter; None for every other request."""
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if not target.startswith(TARGET_PREFIX):
        return None
    _ensure_ticker()
    if target[len(TARGET_PREFIX):] != "ListContainerInstances":
        return None
    try:
        params = json.loads(body or b"{}")
    except ValueError:
        return None
    if not isinstance(params, dict) or params.get("filter") is None:
        return None
    return _list_with_filter(environ, params)


def _service_tasks_on(backend: Any, cluster: str, arn: str) -> list[Any]:
    return [
        t for t in backend.tasks.get(cluster, {}).values()
        if t.container_instance_arn == arn and t.desired_status != "STOPPED"
        and t.last_status != "STOPPED" and str(t.started_by or "").startswith("ecs-svc/")
    ]


def _move_one(backend: Any, cluster: str, ci: Any, now: float) -> None:
    """The service scheduler's next replacement for a draining container instance."""
    tasks = _service_tasks_on(backend, cluster, ci.container_instance_arn)
    if not tasks:
        return
    last = _LAST_MOVE.setdefault(ci.container_instance_arn, now)
    if now - last < DRAIN_STEP_SECONDS:
        return
    active = [c for c in backend.container_instances.get(cluster, {}).values() if c.status == "ACTIVE"]
    if not active:
        return
    to = min(active, key=lambda c: c.running_tasks_count)
    task = tasks[0]
    new = backend.start_task(cluster, task.task_definition_arn, [to.container_instance_arn], {},
                             task.started_by)
    backend.stop_task(cluster, task.task_arn, "Container instance is draining: task replaced")
    _LAST_MOVE[ci.container_instance_arn] = now
    MOVES.append({
        "cluster": cluster, "task": task.task_arn, "replacement": new[0].task_arn,
        "from": ci.container_instance_arn, "to": to.container_instance_arn, "at": now,
    })


def _tick() -> None:
    from moto.ecs.models import ecs_backends

    now = time.time()
    for _account, regions in list(ecs_backends.items()):
        for _region, backend in list(regions.items()):
            for cluster, instances in list(backend.container_instances.items()):
                if cluster == "orphaned":
                    continue
                for ci in list(instances.values()):
                    if ci.status == "DRAINING":
                        _move_one(backend, cluster, ci, now)


def _ticker() -> None:
    while True:
        time.sleep(TICK_SECONDS)
        try:
            with BACKEND_LOCK, _LOCK:
                _tick()
        except Exception:
            pass


def _ensure_ticker() -> None:
    global _TICKER
    with _LOCK:
        if _TICKER is None:
            _TICKER = threading.Thread(target=_ticker, name="ecs-draining", daemon=True)
            _TICKER.start()


def control(method: str, path: str, body: bytes) -> tuple[str, Any] | None:
    if path != "/_emulator/ecs":
        return None
    if method != "GET":
        return "405 Method Not Allowed", {"error": "GET only"}
    with _LOCK:
        return "200 OK", {"moves": list(MOVES)}


def reset() -> None:
    with _LOCK:
        MOVES.clear()
        _LAST_MOVE.clear()

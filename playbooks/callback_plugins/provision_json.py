# provision_json: an ansible-playbook stdout callback that prints the whole run as one JSON
# document, for programs that need per-host results (provision, the integration tests).
#
# ansible-core has no JSON stdout callback (ansible.posix.json lives in the `ansible` package's
# collections, which are not installed), hence this one. It is found as a plugin adjacent to the
# playbooks in this directory, or anywhere through ANSIBLE_CALLBACK_PLUGINS=<this directory>,
# and chosen with ANSIBLE_STDOUT_CALLBACK=provision_json.
#
# Output (stdout, at the end of each playbook of the run, so one document per playbook given;
# errors and warnings still go to stderr):
#   {
#     "plays": [{"play": {"name": ..., "id": ...},
#                "tasks": [{"task": {"name": ..., "id": ..., "action": ...},
#                           "hosts": {"web1": {"changed": false, ... module result ...,
#                                              "status": "ok|changed|failed|skipped|unreachable"}}}]}],
#     "stats": {"web1": {"ok": 3, "changed": 1, "failures": 0, "unreachable": 0,
#                        "skipped": 0, "rescued": 0, "ignored": 0}},
#     "custom_stats": {...}, "global_custom_stats": {...}
#   }
# Results of tasks with no_log are censored by ansible before they get here.
# Output from hosts is bounded: a string longer than PROVISION_JSON_MAX_STRING characters
# (default 65536) keeps its head and tail around a "[… N characters left out …]" line, and a
# list longer than 2000 items its first and last 1000, so a chatty host cannot make the
# document unbounded.

from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

MAX_STRING = int(os.environ.get("PROVISION_JSON_MAX_STRING") or 65536)
MAX_ITEMS = 2000


def _bounded(value):
    """The value with every long string and list cut to its head and tail."""
    if isinstance(value, str) and len(value) > MAX_STRING:
        half = MAX_STRING // 2
        left_out = len(value) - 2 * half
        return f"{value[:half]}\n[… {left_out} characters left out …]\n{value[-half:]}"
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            half = MAX_ITEMS // 2
            value = value[:half] + [f"[… {len(value) - 2 * half} items left out …]"] + value[-half:]
        return [_bounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _bounded(v) for k, v in value.items()}
    return value

DOCUMENTATION = """
    name: provision_json
    type: stdout
    short_description: the whole run as one JSON document, with per-host stats
    description:
      - Prints plays, tasks, per-host task results and per-host stats as one JSON document
        when the run ends.
    requirements:
      - set as the stdout callback (ANSIBLE_STDOUT_CALLBACK=provision_json)
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "provision_json"

    def __init__(self, display=None):
        super().__init__(display)
        self._plays = []
        self._tasks = {}  # task uuid -> entry in the current play

    def _start_task(self, task):
        entry = {
            "task": {"name": task.get_name(), "id": str(task._uuid), "action": task.action},
            "hosts": {},
        }
        if not self._plays:
            self._plays.append({"play": {"name": "", "id": ""}, "tasks": []})
        self._plays[-1]["tasks"].append(entry)
        self._tasks[str(task._uuid)] = entry

    def _record(self, result, status):
        task_id = str(result._task._uuid)
        if task_id not in self._tasks:
            self._start_task(result._task)
        try:
            data = json.loads(self._dump_results(result._result))
        except (TypeError, ValueError):
            data = {"msg": "unserializable result"}
        if not isinstance(data, dict):
            data = {"result": data}
        data = _bounded(data)
        if status == "ok" and data.get("changed"):
            status = "changed"
        data["status"] = status
        self._tasks[task_id]["hosts"][result._host.get_name()] = data

    # plays and tasks

    def v2_playbook_on_play_start(self, play):
        self._plays.append({"play": {"name": play.get_name(), "id": str(play._uuid)}, "tasks": []})
        self._tasks = {}

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._start_task(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._start_task(task)

    # results

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")

    # the end

    def v2_playbook_on_stats(self, stats):
        hosts = sorted(stats.processed.keys())
        custom = dict(stats.custom)
        output = {
            "plays": self._plays,
            "stats": {h: stats.summarize(h) for h in hosts},
            "custom_stats": {h: v for h, v in custom.items() if h != "_run"},
            "global_custom_stats": custom.get("_run", {}),
        }
        self._display.display(json.dumps(output, indent=2, sort_keys=True, default=str))
        # several playbooks in one run: one document each
        self._plays = []
        self._tasks = {}

# provision_batch: the inventory of one provision run, read once provision has written it.
#
# provision starts ansible-playbook when a batch opens, while the batch's instances are still
# being reached, so that Python's start, ansible's imports and its plugins' loading overlap the
# reaching instead of following it. This plugin is where that early run waits: its source is a
# file named `batch.provision` in the run's private directory, holding the longest wait in
# seconds; the plugin waits for `inventory.json` to appear beside it (provision renames it
# into place once the batch is complete) and reads it exactly as the `yaml` inventory plugin
# reads any YAML or JSON inventory (so `{"__ansible_unsafe": ...}` values stay text).
#
# With a Mitogen strategy chosen, Mitogen's strategy modules are imported while waiting.
#
# It gives up, failing the run, when the wait passes or when the process that started it (the
# parent) is gone: an early run is never left behind waiting for an inventory nobody writes.
# provision chooses it with ANSIBLE_INVENTORY_ENABLED=provision_batch and finds it through
# ANSIBLE_INVENTORY_PLUGINS; a run started once its batch is complete finds the inventory there
# at once.

from __future__ import annotations

import os
import time

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin
from ansible.plugins.loader import inventory_loader

DOCUMENTATION = r"""
name: provision_batch
short_description: the inventory of one provision run, waited for
description:
  - Waits for C(inventory.json) beside the C(batch.provision) source, then reads it as the
    yaml inventory plugin does.
"""

SOURCE = "batch.provision"
INVENTORY = "inventory.json"
POLL = 0.01


def _import_mitogen():
    """Mitogen's strategy modules, imported while the run waits (about 0.1 s less once the
    inventory is there); its strategy plugin imports them from there. Not importable from
    here (Mitogen found only through its plugin directory): the plugin imports them itself."""
    try:
        import ansible_mitogen.strategy  # noqa: F401
    except Exception:  # noqa: BLE001 - only a head start; the strategy plugin says what is wrong
        pass


class InventoryModule(BaseInventoryPlugin):
    NAME = "provision_batch"

    def verify_file(self, path):
        return os.path.basename(path) == SOURCE and os.path.isfile(path)

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        try:
            with open(path, encoding="utf-8") as f:
                wait = float(f.read().strip() or "0")
        except (OSError, ValueError) as e:
            raise AnsibleParserError(f"{path}: not a provision batch source: {e}") from e
        if os.environ.get("ANSIBLE_STRATEGY", "").startswith("mitogen_"):
            _import_mitogen()
        ready = os.path.join(os.path.dirname(path), INVENTORY)
        parent = os.getppid()
        deadline = time.monotonic() + wait
        while not os.path.exists(ready):
            if os.getppid() != parent:
                raise AnsibleParserError("provision, which started this run, is gone")
            if time.monotonic() >= deadline:
                raise AnsibleParserError(
                    f"provision wrote no inventory within {wait:.0f}s of this run's start"
                )
            time.sleep(POLL)
        inventory_loader.get("yaml").parse(inventory, loader, ready, cache=False)

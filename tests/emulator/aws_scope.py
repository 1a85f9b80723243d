"""The account and region of a request, as moto derives them: shared by the extension
modules (console, opsworks, ecs) that keep their own state per account and region."""

from __future__ import annotations

import re
from typing import Any

DEFAULT_ACCOUNT = "123456789012"
DEFAULT_REGION = "us-east-1"

_CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/\d{8}/([^/,\s]+)/")


def scope(environ: dict[str, Any]) -> tuple[str, str]:
    """(account, region) of a request: from its SigV4 credential scope, else the defaults."""
    m = _CREDENTIAL_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
    if not m:
        return DEFAULT_ACCOUNT, DEFAULT_REGION
    try:
        from moto.iam.models import get_account_id_from

        return get_account_id_from(m.group(1)), m.group(2)
    except Exception:
        return DEFAULT_ACCOUNT, m.group(2)

"""STS AssumeRole as AWS decides it: moto grants any role ARN, in any account, to anyone.

AWS answers AccessDenied ("User: CALLER is not authorized to perform: sts:AssumeRole on
resource: ROLE") when the role does not exist, or when its trust policy (the role's
AssumeRolePolicyDocument) has no statement allowing sts:AssumeRole to the caller, with its
conditions met. This module refuses such a request before moto sees it, and lets moto answer
the others (moto then hands out credentials of the role's account, which select that
account on every later request).

The trust policy is evaluated as IAM does for what a cross-account trust uses: statements
with Effect Allow (an explicit Deny wins), Action sts:AssumeRole (or sts:*, *), Principal
{"AWS": ...} naming "*", the caller's account (its 12 digits or arn:...:iam::ACCOUNT:root),
the caller's own ARN, or the role whose session the caller is (an assumed role's
arn:...:sts::ACCOUNT:assumed-role/NAME/SESSION matches arn:...:iam::ACCOUNT:role/NAME);
Condition StringEquals on sts:ExternalId (a value or a list). A statement with any other
condition does not allow (this emulator cannot judge it). The caller's own identity policy,
which AWS also consults, is not evaluated (moto keeps no policies for the default
credentials).
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import parse_qs, unquote
from xml.sax.saxutils import escape

import aws_scope

TARGET_PREFIX = "AWSSecurityTokenServiceV20110615."


def _params(environ: dict[str, Any], body: bytes) -> dict[str, str]:
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target.startswith(TARGET_PREFIX):
        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            return {}
        return {"Action": target[len(TARGET_PREFIX):], **{k: str(v) for k, v in doc.items()}}
    query = parse_qs(environ.get("QUERY_STRING", ""))
    query.update(parse_qs(body.decode("utf-8", "replace")))
    return {k: v[0] for k, v in query.items()}


def _caller(environ: dict[str, Any], account: str) -> str:
    """The caller's ARN, as STS would name it in an AccessDenied message."""
    key = ""
    auth = environ.get("HTTP_AUTHORIZATION", "")
    if "Credential=" in auth:
        key = auth.split("Credential=", 1)[1].split("/", 1)[0]
    try:
        from moto.sts.models import sts_backends

        for partition in sts_backends[account].values():
            role = partition.get_assumed_role_from_access_key(key)
            if role is not None:
                return role.arn
    except Exception:
        pass
    return f"arn:aws:iam::{account}:root" if key else "anonymous"


def _role(role_arn: str) -> Any:
    """The IAM role an ARN names, in its own account; None when it does not exist."""
    parts = role_arn.split(":", 5)
    if len(parts) != 6 or parts[2] != "iam" or not parts[5].startswith("role/"):
        return None
    account, name = parts[4], parts[5].rsplit("/", 1)[-1]
    from moto.iam.models import iam_backends

    try:
        backend = iam_backends[account]["aws"]
    except KeyError:
        return None
    for role in list(backend.roles.values()):
        if role.name == name:
            return role
    return None


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def _principal_matches(principal: Any, caller: str, account: str) -> bool:
    if principal == "*":
        return True
    if not isinstance(principal, dict):
        return False
    for p in _as_list(principal.get("AWS", [])):
        if p in ("*", account, f"arn:aws:iam::{account}:root", caller):
            return True
        # arn:aws:iam::ACCOUNT:role/NAME names every session of that role.
        if caller.startswith(f"arn:aws:sts::{account}:assumed-role/"):
            role_name = caller.split("/")[1]
            if isinstance(p, str) and p.startswith(f"arn:aws:iam::{account}:role/") \
                    and p.rsplit("/", 1)[-1] == role_name:
                return True
    return False


def _conditions_met(condition: Any, external_id: str | None) -> bool:
    if not condition:
        return True
    if set(condition) != {"StringEquals"} or set(condition["StringEquals"]) != {"sts:ExternalId"}:
        return False
    wanted = [str(v) for v in _as_list(condition["StringEquals"]["sts:ExternalId"])]
    return external_id is not None and external_id in wanted


def _actions_match(action: Any) -> bool:
    return any(a in ("sts:AssumeRole", "sts:*", "*") for a in _as_list(action))


def allowed(role: Any, caller: str, account: str, external_id: str | None) -> bool:
    try:
        doc = role.assume_role_policy_document
        policy = json.loads(unquote(doc) if isinstance(doc, str) else json.dumps(doc))
    except (ValueError, TypeError):
        return False
    allow = False
    for st in _as_list(policy.get("Statement", [])):
        if not isinstance(st, dict) or not _actions_match(st.get("Action")):
            continue
        if not _principal_matches(st.get("Principal"), caller, account):
            continue
        if not _conditions_met(st.get("Condition"), external_id):
            continue
        if st.get("Effect") == "Deny":
            return False
        allow |= st.get("Effect") == "Allow"
    return allow


def _access_denied(caller: str, role_arn: str) -> tuple[str, list[tuple[str, str]], bytes]:
    message = f"User: {caller} is not authorized to perform: sts:AssumeRole on resource: {role_arn}"
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<Error><Type>Sender</Type><Code>AccessDenied</Code><Message>{escape(message)}</Message></Error>"
        f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    ).encode()
    return "403 Forbidden", [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))], body


def dispatch(environ: dict[str, Any], body: bytes) -> tuple[str, list[tuple[str, str]], bytes] | None:
    """AccessDenied for an AssumeRole AWS would refuse; None for every other request."""
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target and not target.startswith(TARGET_PREFIX):
        return None
    if not target and b"AssumeRole" not in body and "AssumeRole" not in environ.get("QUERY_STRING", ""):
        return None
    params = _params(environ, body)
    if params.get("Action") != "AssumeRole":
        return None
    account, _region = aws_scope.scope(environ)
    caller = _caller(environ, account)
    role_arn = params.get("RoleArn", "")
    role = _role(role_arn)
    if role is None or not allowed(role, caller, account, params.get("ExternalId")):
        return _access_denied(caller, role_arn)
    return None


def control(method: str, path: str, body: bytes) -> tuple[str, Any] | None:
    """No endpoints of its own."""
    return None


def reset() -> None:
    """No state of its own (the roles are moto's IAM)."""

#!/usr/bin/env python3
"""Checks that an IAM policy allows every AWS API operation the provision binary made.

usage: check_iam.py POLICY CALLS_DIR
       check_iam.py --scopes POLICY CONFIG
       check_iam.py --self-test

CALLS_DIR holds one *.json file per integration test, each an object
{"service:Operation": count, ...} (the emulator's per-operation call counters). Every
operation with a count above zero is mapped to the IAM action that authorizes it
(sqs:DeleteMessageBatch -> sqs:DeleteMessage, sns:PublishBatch -> sns:Publish, ...; otherwise
the same name) and must be covered by the Action of an Allow statement of POLICY (IAM
wildcards * and ? allowed, case-insensitive). Resources and conditions are not evaluated: the
check is about actions, the policy's scoping is reviewed by people.

POLICY is an IAM policy document (JSON), or a CloudFormation template (YAML): then the inline
policies of each of its roles that EC2 or Lambda assumes (the ops host's, the function's) are
checked, each role on its own, as the policy of that role; and of each role another account's
principal assumes (config/member-role.yaml's, which a source with role_arn uses), checked
against the calls a source makes: every call but those the ops host always makes with its
own role (HOST_ONLY: the claims and history tables, the result topic, the vault password,
AssumeRole itself).

Prints a table operation -> action -> covering Sid, then warns (without failing) about
actions the policy allows that no test exercised.

--scopes: every group glob of every layer of CONFIG (a provision.toml) must lie within the
group names each group-scoped statement of POLICY allows (autoScalingGroupName/ resources,
aws:autoscaling:groupName conditions): an example config whose layers the example policy
does not reach would have its hooks, tags and commands refused. Exit 1 when one does not. Exit status: 0 when every operation is
allowed, 1 when some are not or when there is nothing to check (no CALLS_DIR, no call files,
no calls: a check that checks nothing is a defect), 2 on bad usage.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

# API operations authorized by an IAM action of another name. Everything else is authorized
# by the action of the same name (service prefix included).
ACTION_FOR_OPERATION = {
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sns:PublishBatch": "sns:Publish",
    "ssm:GetCommandInvocation": "ssm:GetCommandInvocation",
}

# Actions the binary never calls itself but that a call it makes needs: SSM decrypts a
# SecureString with the caller's kms:Decrypt. Counted as exercised when the call was made.
IMPLIED_BY = {
    "kms:Decrypt": ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"],
}

# Operations the ops host makes with its own credentials whatever the source (what every
# source shares lives in the ops account): a member account's role needs none of them.
HOST_ONLY = re.compile(r"^(dynamodb:.*|sns:.*|sts:.*|ssm:GetParameters?|ssm:GetParametersByPath)$")

USAGE = ("usage: check_iam.py POLICY CALLS_DIR\n       check_iam.py --scopes POLICY CONFIG\n"
         "       check_iam.py --self-test")

OPERATION_RE = re.compile(r"^[a-z0-9-]+:[A-Za-z0-9]+$")


class CheckError(Exception):
    """A problem with the inputs: reported, exit status 1."""


def action_for(operation: str) -> str:
    return ACTION_FOR_OPERATION.get(operation, operation)


def pattern_re(pattern: str) -> re.Pattern[str]:
    """An IAM action pattern (* and ? wildcards, case-insensitive) as a regex."""
    out = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(f"^{out}$", re.IGNORECASE)


def as_list(value: object) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def load_template(path: Path) -> dict:
    """A CloudFormation template, its intrinsic functions (!Sub, !Ref, ...) kept as
    {"Fn::Sub": ...} values."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def intrinsic(loader, tag_suffix, node):
        name = "Ref" if tag_suffix == "Ref" else f"Fn::{tag_suffix}"
        if isinstance(node, yaml.ScalarNode):
            return {name: loader.construct_scalar(node)}
        if isinstance(node, yaml.SequenceNode):
            return {name: loader.construct_sequence(node, deep=True)}
        return {name: loader.construct_mapping(node, deep=True)}

    Loader.add_multi_constructor("!", intrinsic)
    try:
        doc = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (a SafeLoader)
    except (OSError, yaml.YAMLError) as e:
        raise CheckError(f"{path}: cannot read the template: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("Resources"), dict):
        raise CheckError(f"{path}: not a CloudFormation template (no Resources)")
    return doc


def member_role(props: dict) -> bool:
    """Whether a role is assumed by another account's principal (Principal AWS)."""
    statements = as_list(props.get("AssumeRolePolicyDocument", {}).get("Statement"))
    return any(isinstance(st, dict) and isinstance(st.get("Principal"), dict)
               and "AWS" in st["Principal"] for st in statements)


def template_role_policies(path: Path) -> dict[str, dict]:
    """{role logical id: one policy document of all its inline policies' statements}, for the
    roles EC2 or Lambda assumes (the ops host's, the function's) and those another account
    assumes (a member account's; the name ends in "(member)")."""
    roles = {}
    for name, res in load_template(path)["Resources"].items():
        if not isinstance(res, dict) or res.get("Type") != "AWS::IAM::Role":
            continue
        props = res.get("Properties", {})
        trust = json.dumps(props.get("AssumeRolePolicyDocument", {}))
        if member_role(props):
            name = f"{name} (member)"
        elif "ec2.amazonaws.com" not in trust and "lambda.amazonaws.com" not in trust:
            continue
        statements = []
        for pol in as_list(props.get("Policies")):
            statements += as_list(pol.get("PolicyDocument", {}).get("Statement"))
        roles[name] = {"Version": "2012-10-17", "Statement": statements}
    if not roles:
        raise CheckError(f"{path}: no role that EC2, Lambda or another account assumes")
    return roles


def policy_statements(path: Path, doc: object) -> list[dict]:
    if not isinstance(doc, dict) or "Statement" not in doc:
        raise CheckError(f"{path}: not an IAM policy document (no Statement)")
    statements = []
    for i, st in enumerate(as_list(doc["Statement"])):
        if not isinstance(st, dict) or st.get("Effect") not in ("Allow", "Deny"):
            raise CheckError(f"{path}: statement {i}: needs an Effect of Allow or Deny")
        st = dict(st)
        st.setdefault("Sid", f"#{i}")
        statements.append(st)
    return statements


def load_policy(path: Path) -> list[dict]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckError(f"{path}: cannot read the policy: {e}") from e
    return policy_statements(path, doc)


def load_policies(path: Path) -> dict[str, list[dict]]:
    """{name: statements}: a JSON policy file is one, a template one per role."""
    if path.suffix in (".yaml", ".yml"):
        return {f"{path}#{role}": policy_statements(path, doc)
                for role, doc in template_role_policies(path).items()}
    return {str(path): load_policy(path)}


def load_calls(calls_dir: Path) -> tuple[dict[str, int], list[Path]]:
    if not calls_dir.is_dir():
        raise CheckError(
            f"{calls_dir}: no such directory. Run the integration tests with call recording "
            f"first: without recorded calls there is nothing to check the policy against"
        )
    files = sorted(calls_dir.glob("*.json"))
    if not files:
        raise CheckError(
            f"{calls_dir}: no *.json call files. Run the integration tests with call recording "
            f"first: without recorded calls there is nothing to check the policy against"
        )
    totals: dict[str, int] = {}
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CheckError(f"{f}: cannot read: {e}") from e
        if not isinstance(doc, dict):
            raise CheckError(f'{f}: expected an object {{"service:Operation": count}}')
        for op, n in doc.items():
            if not OPERATION_RE.match(op):
                raise CheckError(f'{f}: "{op}" is not "service:Operation"')
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise CheckError(f'{f}: "{op}": the count must be a non-negative integer, got {n!r}')
            if n > 0:
                totals[op] = totals.get(op, 0) + n
    if not totals:
        raise CheckError(f"{calls_dir}: the call files record no calls at all: nothing to check")
    return totals, files


def statement_covers(st: dict, action: str) -> bool:
    if "Action" in st:
        return any(pattern_re(p).match(action) for p in as_list(st["Action"]))
    if "NotAction" in st:
        return not any(pattern_re(p).match(action) for p in as_list(st["NotAction"]))
    return False


def unconditional_everywhere(st: dict) -> bool:
    return "Condition" not in st and "*" in as_list(st.get("Resource"))


def check(policy_path: Path, calls_dir: Path) -> int:
    totals, files = load_calls(calls_dir)
    worst = 0
    for name, statements in load_policies(policy_path).items():
        calls = totals
        if name.endswith(" (member)"):
            calls = {op: n for op, n in totals.items() if not HOST_ONLY.match(action_for(op))}
        worst = max(worst, check_statements(name, statements, calls, files, calls_dir))
    return worst


# Where a statement scopes Auto Scaling groups: the group name in an ARN, or the tag Auto
# Scaling puts on the group's instances.
GROUP_ARN_RE = re.compile(r"autoScalingGroupName/(.+)$")
GROUP_CONDITION_KEYS = ("aws:resourcetag/aws:autoscaling:groupname",
                        "ssm:resourcetag/aws:autoscaling:groupname")


def group_scopes(st: dict) -> list[str] | None:
    """The group name patterns a statement is limited to, or None when it is not limited by
    group."""
    found = []
    for r in as_list(st.get("Resource")):
        m = GROUP_ARN_RE.search(r) if isinstance(r, str) else None
        if m:
            found.append(m.group(1))
    for op in (st.get("Condition") or {}).values():
        for key, values in (op or {}).items():
            if key.lower() in GROUP_CONDITION_KEYS:
                found += [v for v in as_list(values) if isinstance(v, str)]
    return found or None


def glob_within(layer_glob: str, policy_pattern: str) -> bool:
    """Whether every name the layer's glob matches is matched by the policy's pattern: the
    policy's * takes any run of the glob's characters, its ? one character but not a *."""
    out = "".join(".*" if c == "*" else "[^*]" if c == "?" else re.escape(c) for c in policy_pattern)
    return re.fullmatch(out, layer_glob) is not None


def check_scopes(policy_path: Path, config_path: Path) -> int:
    import tomllib

    try:
        config = tomllib.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckError(f"{config_path}: cannot read the config: {e}") from e
    layers = {name: as_list(layer.get("groups")) for name, layer in (config.get("layers") or {}).items()}
    if not layers:
        raise CheckError(f"{config_path}: no layers: nothing to check the scopes against")
    problems, checked = [], 0
    for st in load_policy(policy_path):
        scopes = group_scopes(st) if st["Effect"] == "Allow" else None
        if scopes is None:
            continue
        checked += 1
        for layer, globs in layers.items():
            for g in globs:
                if not any(glob_within(g, p) for p in scopes):
                    problems.append(f"layers.{layer}: group {g!r} is outside statement {st['Sid']} "
                                    f"(groups {', '.join(scopes)})")
    if not checked:
        raise CheckError(f"{policy_path}: no statement is scoped by group: nothing to check")
    if problems:
        print(f"check_iam: FAIL: {config_path}'s layers reach groups {policy_path} does not allow:",
              file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"check_iam: OK: every layer of {config_path} lies within the {checked} group-scoped "
          f"statement(s) of {policy_path}")
    return 0


def check_statements(policy_path: str, statements: list[dict], totals: dict[str, int],
                     files: list[Path], calls_dir: Path) -> int:
    print(f"check_iam: {len(totals)} operations from {len(files)} call files in {calls_dir}, "
          f"against {policy_path}")

    rows, missing = [], []
    exercised_actions = set()
    for op in sorted(totals):
        action = action_for(op)
        exercised_actions.add(action)
        allows = [st["Sid"] for st in statements if st["Effect"] == "Allow" and statement_covers(st, action)]
        denies = [st["Sid"] for st in statements
                  if st["Effect"] == "Deny" and statement_covers(st, action) and unconditional_everywhere(st)]
        if denies:
            verdict = "DENIED by " + ", ".join(denies)
            missing.append((op, action, verdict))
        elif allows:
            verdict = ", ".join(allows)
        else:
            verdict = "NOT ALLOWED"
            missing.append((op, action, verdict))
        rows.append((op, str(totals[op]), action, verdict))

    header = ("OPERATION", "CALLS", "IAM ACTION", "COVERED BY (Sid)")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    for r in [header] + rows:
        print(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")

    # Policy actions no test exercised: a hint that either the policy is wider than needed
    # or the tests do not reach that code path.
    exercised_actions |= {a for a, by in IMPLIED_BY.items() if exercised_actions & set(by)}
    for st in statements:
        if st["Effect"] != "Allow":
            continue
        for p in as_list(st.get("Action")):
            rx = pattern_re(p)
            if not any(rx.match(a) for a in exercised_actions):
                print(f"check_iam: warning: {p} (Sid {st['Sid']}) is allowed but no test exercised it",
                      file=sys.stderr)
    for st in statements:
        if st["Effect"] == "Deny" and not unconditional_everywhere(st):
            print(f"check_iam: note: Deny statement {st['Sid']} has a Resource or Condition scope; "
                  f"it is not evaluated here", file=sys.stderr)

    if missing:
        print(f"check_iam: FAIL: {len(missing)} operation(s) the binary made are not allowed by "
              f"{policy_path}:", file=sys.stderr)
        for op, action, verdict in missing:
            print(f"  {op} needs {action}: {verdict}", file=sys.stderr)
        return 1
    print(f"check_iam: OK: every operation is allowed by {policy_path}")
    return 0


def main(argv: list[str]) -> int:
    if argv == ["--self-test"]:
        return self_test()
    if len(argv) == 3 and argv[0] == "--scopes":
        try:
            return check_scopes(Path(argv[1]), Path(argv[2]))
        except CheckError as e:
            print(f"check_iam: FAIL: {e}", file=sys.stderr)
            return 1
    if len(argv) != 2 or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return check(Path(argv[0]), Path(argv[1]))
    except CheckError as e:
        print(f"check_iam: FAIL: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------
# Self-test: runs main() on temporary policies and call directories.

def self_test() -> int:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Queue", "Effect": "Allow",
             "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"],
             "Resource": "arn:aws:sqs:REGION:ACCOUNT:q"},
            {"Sid": "Hooks", "Effect": "Allow", "Action": "autoscaling:*LifecycleAction*",
             "Resource": "*"},
            {"Sid": "Topic", "Effect": "Allow", "Action": "SNS:publish", "Resource": "*"},
            {"Sid": "Tags", "Effect": "Allow", "Action": "ec2:CreateTag?", "Resource": "*"},
            {"Sid": "Unused", "Effect": "Allow", "Action": "opsworks:RegisterInstance", "Resource": "*"},
        ],
    }
    good_calls = {
        "sqs:ReceiveMessage": 12, "sqs:DeleteMessageBatch": 3, "sqs:ChangeMessageVisibilityBatch": 1,
        "autoscaling:CompleteLifecycleAction": 3, "autoscaling:RecordLifecycleActionHeartbeat": 2,
        "sns:PublishBatch": 1, "ec2:CreateTags": 3, "ssm:SendCommand": 0,
    }
    failures = []

    def run(args: list[str]) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(args)
        return code, out.getvalue(), err.getvalue()

    def expect(name: str, cond: bool, detail: str = "") -> None:
        if not cond:
            failures.append(f"{name}{': ' + detail if detail else ''}")

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        pol = t / "policy.json"
        pol.write_text(json.dumps(policy))

        calls = t / "calls"
        calls.mkdir()
        (calls / "test_a.json").write_text(json.dumps(good_calls))
        (calls / "test_b.json").write_text(json.dumps({"sqs:ReceiveMessage": 4}))
        (calls / "notes.txt").write_text("not a call file")
        code, out, err = run([str(pol), str(calls)])
        expect("all covered -> 0", code == 0, out + err)
        expect("batch ops map to their action",
               re.search(r"sqs:DeleteMessageBatch\s+3\s+sqs:DeleteMessage\s+Queue", out) is not None, out)
        expect("PublishBatch maps to sns:Publish (case-insensitive match)",
               re.search(r"sns:PublishBatch\s+1\s+sns:Publish\s+Topic", out) is not None, out)
        expect("counts add up across files", re.search(r"sqs:ReceiveMessage\s+16\s", out) is not None, out)
        expect("wildcards * and ? cover", "Hooks" in out and "Tags" in out, out)
        expect("zero-count operations are ignored", "ssm:SendCommand" not in out, out)
        expect("unexercised policy action warned", "opsworks:RegisterInstance" in err and "warning" in err, err)

        (calls / "test_c.json").write_text(json.dumps({"ssm:GetCommandInvocation": 2, "ec2:DescribeInstances": 1}))
        code, out, err = run([str(pol), str(calls)])
        expect("uncovered -> 1", code == 1, out + err)
        expect("uncovered operations listed",
               "ssm:GetCommandInvocation needs ssm:GetCommandInvocation" in err
               and "ec2:DescribeInstances needs ec2:DescribeInstances" in err, err)

        deny = dict(policy, Statement=policy["Statement"] + [
            {"Sid": "NoTags", "Effect": "Deny", "Action": "ec2:CreateTags", "Resource": "*"}])
        (t / "deny.json").write_text(json.dumps(deny))
        (calls / "test_c.json").unlink()
        code, out, err = run([str(t / "deny.json"), str(calls)])
        expect("unconditional Deny wins -> 1", code == 1 and "DENIED by NoTags" in err, out + err)

        empty = t / "empty"
        empty.mkdir()
        code, out, err = run([str(pol), str(empty)])
        expect("empty dir -> 1 with a clear message", code == 1 and "no *.json call files" in err, err)

        code, out, err = run([str(pol), str(t / "missing")])
        expect("missing dir -> 1 with a clear message", code == 1 and "no such directory" in err, err)

        zero = t / "zero"
        zero.mkdir()
        (zero / "t.json").write_text(json.dumps({"sqs:ReceiveMessage": 0}))
        code, out, err = run([str(pol), str(zero)])
        expect("no calls at all -> 1", code == 1 and "no calls at all" in err, err)

        bad = t / "bad"
        bad.mkdir()
        (bad / "t.json").write_text('{"ReceiveMessage": 1}')
        code, out, err = run([str(pol), str(bad)])
        expect("operation without service prefix -> 1", code == 1 and "service:Operation" in err, err)
        (bad / "t.json").write_text("{not json")
        code, out, err = run([str(pol), str(bad)])
        expect("invalid JSON -> 1", code == 1 and "cannot read" in err, err)

        code, out, err = run([str(pol)])
        expect("bad usage -> 2", code == 2 and "usage" in err, err)

        # The project's own policy covers every operation the binary is meant to make.
        project_policy = Path(__file__).resolve().parent.parent / "config" / "iam-policy.json"
        if project_policy.exists():
            full = t / "full"
            full.mkdir()
            (full / "all.json").write_text(json.dumps({op: 1 for op in [
                "sqs:ReceiveMessage", "sqs:DeleteMessageBatch", "sqs:ChangeMessageVisibilityBatch",
                "sqs:GetQueueAttributes", "autoscaling:CompleteLifecycleAction",
                "autoscaling:RecordLifecycleActionHeartbeat", "autoscaling:DescribeLifecycleHooks",
                "autoscaling:DescribeAutoScalingInstances", "ec2:CreateTags", "ec2:DescribeInstances",
                "ec2:GetConsoleOutput", "sns:PublishBatch", "ssm:SendCommand",
                "ssm:ListCommandInvocations", "ssm:CancelCommand", "ssm:DescribeInstanceInformation",
                "ssm:GetParameter", "opsworks:DescribeStacks", "opsworks:DescribeLayers",
                "opsworks:DescribeInstances", "opsworks:GetHostnameSuggestion",
                "opsworks:RegisterInstance", "opsworks:AssignInstance", "opsworks:DeregisterInstance",
                "autoscaling:DescribeAutoScalingGroups", "sns:GetTopicAttributes",
                "dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem",
                "dynamodb:DescribeTable", "dynamodb:DescribeTimeToLive",
                "autoscaling:DescribeWarmPool", "ecs:ListContainerInstances",
                "ecs:DescribeContainerInstances", "ecs:UpdateContainerInstancesState",
                "dynamodb:BatchWriteItem", "dynamodb:Query", "dynamodb:Scan",
                "autoscaling:SetInstanceHealth", "sts:AssumeRole",
            ]}))
            code, out, err = run([str(project_policy), str(full)])
            expect("config/iam-policy.json covers the intended operations, no unused action",
                   code == 0 and "warning" not in err, out + err)

            # The CloudFormation ops host role carries the same permissions.
            template = project_policy.parent / "cloudformation.yaml"
            code, out, err = run([str(template), str(full)])
            expect("config/cloudformation.yaml's ops host role covers the intended operations, "
                   "no unused action", code == 0 and "warning" not in err and "#OpsHostRole" in out,
                   out + err)

            # A member account's role covers what a source's messages need there, and
            # nothing the ops host does with its own role.
            code, out, err = run([str(project_policy.parent / "member-role.yaml"), str(full)])
            expect("config/member-role.yaml's member role covers a source's operations, "
                   "no unused action", code == 0 and "warning" not in err
                   and "#MemberRole (member)" in out and "dynamodb:" not in out, out + err)

            # The Lambda template's function role covers what the function calls for tag
            # and ssm steps (its logs: written by Lambda's runtime, never by the binary).
            lambda_calls = t / "lambda"
            lambda_calls.mkdir()
            (lambda_calls / "all.json").write_text(json.dumps({op: 1 for op in [
                "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibilityBatch",
                "sqs:GetQueueAttributes", "autoscaling:CompleteLifecycleAction",
                "autoscaling:RecordLifecycleActionHeartbeat", "autoscaling:DescribeLifecycleHooks",
                "autoscaling:DescribeAutoScalingInstances", "autoscaling:DescribeAutoScalingGroups",
                "autoscaling:DescribeWarmPool", "dynamodb:GetItem", "dynamodb:UpdateItem",
                "dynamodb:DeleteItem", "ec2:CreateTags", "ec2:DescribeInstances", "ssm:SendCommand",
                "ssm:ListCommandInvocations", "ssm:CancelCommand", "ssm:DescribeInstanceInformation",
            ]}))
            code, out, err = run([str(project_policy.parent / "lambda.yaml"), str(lambda_calls)])
            unexpected = [line for line in err.splitlines() if "warning" in line and "logs:" not in line]
            expect("config/lambda.yaml's function role covers the function's operations",
                   code == 0 and "#FunctionRole" in out and not unexpected, out + err)

            # The example config's layers lie within the example policy's group scopes.
            example = project_policy.parent / "provision.toml"
            code, out, err = run(["--scopes", str(project_policy), str(example)])
            expect("config/provision.toml's layers are within config/iam-policy.json's scopes",
                   code == 0, out + err)

        # Scopes: a layer outside a group-scoped statement fails, naming both.
        scoped = {"Version": "2012-10-17", "Statement": [
            {"Sid": "Hooks", "Effect": "Allow", "Action": "autoscaling:CompleteLifecycleAction",
             "Resource": ["arn:aws:autoscaling:R:A:autoScalingGroup:*:autoScalingGroupName/web-*",
                          "arn:aws:autoscaling:R:A:autoScalingGroup:*:autoScalingGroupName/batch-?"]},
            {"Sid": "Tags", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*",
             "Condition": {"StringLike": {"aws:ResourceTag/aws:autoscaling:groupName": ["web-*"]}}},
        ]}
        (t / "scoped.json").write_text(json.dumps(scoped))
        (t / "in.toml").write_text('[layers.web]\ngroups = ["web-prod-*"]\n')
        code, out, err = run(["--scopes", str(t / "scoped.json"), str(t / "in.toml")])
        expect("a layer within every scope -> 0", code == 0, out + err)
        (t / "out.toml").write_text('[layers.web]\ngroups = ["web-*"]\n[layers.b]\ngroups = ["batch-*"]\n')
        code, out, err = run(["--scopes", str(t / "scoped.json"), str(t / "out.toml")])
        expect("a layer outside a scope -> 1, named with the statement",
               code == 1 and "layers.b: group 'batch-*' is outside statement Hooks" in err
               and "outside statement Tags" in err, out + err)

    if failures:
        print("check_iam self-test: FAIL", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print("check_iam self-test: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

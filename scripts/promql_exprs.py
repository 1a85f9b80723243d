#!/usr/bin/env python3
"""The PromQL expressions of a Grafana dashboard or a Prometheus rules file.

    promql_exprs.py FILE...          one expression a line (whitespace squeezed)
    promql_exprs.py --rules FILE...  a Prometheus rules file with each expression as a
                                     recording rule, Grafana's variables filled in, so
                                     `promtool check rules` parses every one of them

A .json FILE is a Grafana dashboard: panel targets (`expr`) and query variables
(`label_values(SELECTOR, label)`: the selector) are taken. A .yml FILE is a rules file
(PyYAML, from .venv): every rule's `expr`. Used by scripts/lint-config and
tests/monitoring.rs.
"""
import json
import re
import sys

# Grafana's variables, replaced by values of the same type for parsing.
VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
}


def dashboard_expressions(dashboard):
    out = []

    def panels(items):
        for p in items:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append(t["expr"])
            panels(p.get("panels", []))

    panels(dashboard.get("panels", []))
    for v in dashboard.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and isinstance(q, str):
            m = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_]\w*\)\s*", q, re.S)
            out.append(m.group(1) if m else q)
    return out


def rules_expressions(rules):
    return [r["expr"] for g in rules.get("groups", []) for r in g.get("rules", [])]


def expressions(path):
    with open(path) as f:
        if path.endswith(".json"):
            exprs = dashboard_expressions(json.load(f))
        else:
            import yaml

            exprs = rules_expressions(yaml.safe_load(f))
    if not exprs:
        sys.exit(f"{path}: no expressions found")
    return exprs


def main():
    args = sys.argv[1:]
    as_rules = args[:1] == ["--rules"]
    if as_rules:
        args = args[1:]
    if not args:
        sys.exit(__doc__)
    exprs = [e for path in args for e in expressions(path)]
    if not as_rules:
        for e in exprs:
            print(" ".join(str(e).split()))
        return
    print("groups:\n  - name: dashboard\n    rules:")
    for i, e in enumerate(exprs):
        for k, v in VARIABLES.items():
            e = e.replace(k, v)
        if "$" in e:
            sys.exit(f"unknown Grafana variable in {e!r}")
        print(f"      - record: dashboard:expr{i}\n        expr: {json.dumps(e)}")


if __name__ == "__main__":
    main()

"""Benchmarks against the emulator. Prints figures, asserts nothing.

Scenarios (usage: bench.py BINARY [SCENARIO ...], default tag and ssm):
  tag[:N]     a burst of N launches (default 500) with one `tag` step: wall time from first
              message to last completed hook, AWS API calls per launch as counted by the
              emulator, peak RSS of the worker, idle RSS of the daemon
  tag-claims[:N]  the same burst with claims in a DynamoDB table (state.claims_table, as a
              fleet of ops hosts runs): what the shared claims cost in calls per launch
  ssm[:N]     N launches (default 200) with one `ssm` step: SSM API calls per launch, wall time
  ansible[:N] N instances (default 20), each a simulated host (its own sshd in a network
              namespace), configured by a 3-task playbook, in one sitting on the same hosts:
              plain ansible-playbook (Ansible's defaults, pipelining, Mitogen for Ansible) and
              provision (a burst of N launches, one `provision daemon` already polling when
              the group scales out, as in production) under each runner (linear,
              linear+pipelining, mitogen: the default): wall time (provision: first message to
              last completed hook), CPU seconds of the whole ops-side process tree, and both
              as a ratio to plain Mitogen (target for the default runner <= 1.1). Every row
              uses provision's default forks; BENCH_FORKS=5,20 adds provision rows with those
              forks. BENCH_REPEAT=3 runs every row three times in rounds and shows medians;
              BENCH_ROWS=mitogen keeps the rows whose name has that word; BENCH_IN_FLIGHT=N
              sets queue.max_in_flight. Before the table, a timeline per provision row: for
              each pair of consecutive moments of a launch (hook fired, received, verified,
              host keys, sshd up, cloud-init done, batch started, playbook ended, step ended,
              hook completed) the median and worst gap over the instances. Runs
              benches/ansible.rs (`cargo test --bench ansible`) with PROVISION_BIN=BINARY:
              the release build of provision, as production runs it (the daemon's own CPU
              is shown apart). Needs root (network namespaces), takes a few minutes, so it
              is not in the default set.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emu  # noqa: E402


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run_worker(binary, config, env, work):
    """Runs `provision worker`; returns (exit code, wall seconds, cpu seconds, peak RSS KiB)."""
    worker_log = os.path.join(work, "worker.log")
    start = time.time()
    worker = subprocess.Popen([binary, "--config", config, "--log-format", "json", "worker"], env=env,
                              stderr=open(worker_log, "w"))
    _, status, usage = os.wait4(worker.pid, 0)
    elapsed = time.time() - start
    # The worker reports its own peak RSS (VmHWM) when it stops. (wait4's ru_maxrss would
    # count the pages of this Python process, forked before exec.)
    peak_kib = 0
    with open(worker_log) as f:
        for line in f:
            if '"stopped"' in line:
                peak_kib = json.loads(line).get("peak_rss_kib", 0)
    return os.waitstatus_to_exitcode(status), start, elapsed, usage.ru_utime + usage.ru_stime, peak_kib


def print_calls(calls, launches, prefix=""):
    for k, v in sorted(calls.items(), key=lambda kv: -kv[1]):
        if k.startswith(prefix):
            print(f"    {k:40} {v:6}  ({v / launches:.3f} per launch)")


def bench_ssm(binary, launches):
    work = tempfile.mkdtemp(prefix="provision-bench-ssm-")
    aws = emu.Emulator(os.path.join(work, "emulator.log"))
    try:
        url, arn = aws.queue("asg-lifecycle")
        aws.group("app-bench", max_size=launches + 10)
        aws.hook("app-bench", "provision-launch", emu.LAUNCH, arn, heartbeat=600, metadata={"role": "api"})
        config = os.path.join(work, "provision.toml")
        emu.write_config(config, url, os.path.join(work, "state.db"), wait_time="1s", extra='''
[layers.app]
groups = ["app-*"]
vars = { role = "[a-z]{1,16}" }
launch = [ { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["echo {metadata.role} > role"] } } } ]
''')
        aws.asg.set_desired_capacity(AutoScalingGroupName="app-bench", DesiredCapacity=launches)
        while aws.queue_depth(url)[0] < launches:
            time.sleep(0.2)
        aws.control("POST", "/_emulator/calls/reset")
        code, start, elapsed, cpu, peak_kib = run_worker(binary, config, aws.env(), work)
        calls = aws.control("GET", "/_emulator/calls")["calls"]
        actions = aws.control("GET", "/_emulator/lifecycle")["actions"]
        done = [a for a in actions if a["state"] == "finished"]
        continued = [a for a in done if a["result"] == "CONTINUE" and a["finished_by"] == "complete"]
        last_done = max(a["finished"] for a in done) if done else float("nan")
        ssm_calls = sum(v for k, v in calls.items() if k.startswith("ssm:"))
        commands = aws.control("GET", "/_emulator/ssm")["commands"]
        print(f"\n== ssm: {launches} launches, one ssm step (AWS-RunShellScript)")
        print(f"worker exit status               {code}")
        print(f"hooks completed with CONTINUE    {len(continued)}/{launches}")
        print(f"SendCommand calls                {len(commands)} (instances per command: {sorted(len(c['instance_ids']) for c in commands)})")
        print(f"worker start -> last completion  {last_done - start:.2f} s")
        print(f"worker CPU (user+sys)            {cpu:.2f} s")
        print(f"worker peak RSS                  {peak_kib / 1024:.1f} MiB")
        print(f"SSM API calls                    {ssm_calls}  ({ssm_calls / launches:.3f} per launch)")
        print_calls(calls, launches, "ssm:")
        print(f"all AWS API calls                {sum(calls.values())}  ({sum(calls.values()) / launches:.2f} per launch)")
        return {"ssm_launches": launches, "ssm_calls_per_launch": round(ssm_calls / launches, 3),
                "ssm_seconds_to_last_completion": round(last_done - start, 2)}
    finally:
        aws.stop()


def require_root(scenario):
    if os.geteuid() != 0:
        raise SystemExit(f"bench {scenario}: needs root (each simulated instance is an sshd in its "
                         f"own network namespace); run it as root, e.g. sudo scripts/bench {scenario}")


def bench_ansible(binary, instances):
    """Runs benches/ansible.rs over `binary` (it prints the figures) and relays its report."""
    require_root("ansible")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = ["cargo", "test", "--bench", "ansible"]
    env = {"BENCH_INSTANCES": str(instances), "PROVISION_BIN": os.path.abspath(binary)}
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"\n(running: {shown} {' '.join(cmd)})", flush=True)
    out = subprocess.run(cmd, cwd=root, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
    figures, report = None, False
    for line in out.stdout.splitlines():
        # The timelines of provision's rows come first, then the table.
        if line.startswith("== ansible") or line.startswith("-- timeline of"):
            report = True
        if line.startswith("BENCH_JSON "):
            figures = json.loads(line[len("BENCH_JSON "):])
            report = False
        elif report:
            print(line)
    if out.returncode != 0 or figures is None:
        print(out.stdout)
        raise SystemExit(f"bench ansible: the benchmark failed (exit {out.returncode})")
    return figures


def main():
    binary = sys.argv[1]
    scenarios = sys.argv[2:] or ["tag", "ssm"]
    for sc in scenarios:
        if sc.partition(":")[0] not in ("tag", "tag-claims", "ssm", "ansible"):
            raise SystemExit(f"unknown scenario {sc!r} (tag[:N], tag-claims[:N], ssm[:N], ansible[:N])")
    if any(sc.partition(":")[0] == "ansible" for sc in scenarios):
        require_root("ansible")
    figures = {}
    for sc in scenarios:
        name, _, n = sc.partition(":")
        if name == "tag":
            figures.update(bench_tag(binary, int(n or 500)))
        elif name == "tag-claims":
            figures["claims_table"] = bench_tag(binary, int(n or 500), claims=True)
        elif name == "ssm":
            figures.update(bench_ssm(binary, int(n or 200)))
        elif name == "ansible":
            figures.update(bench_ansible(binary, int(n or 20)))
    print("\n" + json.dumps(figures))


def bench_tag(binary, launches, claims=False):
    work = tempfile.mkdtemp(prefix="provision-bench-")
    aws = emu.Emulator(os.path.join(work, "emulator.log"))
    try:
        url, arn = aws.queue("asg-lifecycle")
        topic, results_url = aws.topic_with_queue("provision-results")
        aws.group("web-bench", max_size=launches + 10)
        aws.hook("web-bench", "provision-launch", emu.LAUNCH, arn, heartbeat=600,
                 metadata={"environment": "bench", "platform": "web", "major": "3"})
        config = os.path.join(work, "provision.toml")
        table = None
        if claims:
            table = "provision-claims"
            aws.claims_table(table)
        emu.write_config(config, url, os.path.join(work, "state.db"), topic_arn=topic, wait_time="1s",
                         claims_table=table)

        # Idle daemon: started on an empty queue, measured after a few polls.
        aws.drain(url)
        daemon = subprocess.Popen([binary, "--config", config, "daemon"], env=aws.env(),
                                  stderr=open(os.path.join(work, "daemon.log"), "w"))
        time.sleep(5)
        idle_rss = rss_kib(daemon.pid)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)

        t0 = time.time()
        aws.asg.set_desired_capacity(AutoScalingGroupName="web-bench", DesiredCapacity=launches)
        while aws.queue_depth(url)[0] < launches:
            time.sleep(0.2)
        scale_out = time.time() - t0
        aws.control("POST", "/_emulator/calls/reset")

        code, start, elapsed, cpu, peak_kib = run_worker(binary, config, aws.env(), work)
        calls = aws.control("GET", "/_emulator/calls")["calls"]
        actions = aws.control("GET", "/_emulator/lifecycle")["actions"]
        done = [a for a in actions if a["state"] == "finished"]
        continued = [a for a in done if a["result"] == "CONTINUE" and a["finished_by"] == "complete"]
        first_msg = min(a["created"] for a in actions)
        last_done = max(a["finished"] for a in done) if done else float("nan")
        total = sum(calls.values())

        where = "claims in a DynamoDB table" if claims else "claims in state.db"
        print(f"\n== tag: a burst of {launches} launches, one tag step, {where}")
        print(f"worker exit status               {code}")
        print(f"hooks completed with CONTINUE    {len(continued)}/{launches}")
        print(f"emulator scale-out (not ours)    {scale_out:.1f} s")
        print(f"worker start -> last completion  {last_done - start:.2f} s")
        print(f"first message -> last completion {last_done - first_msg:.2f} s")
        print(f"worker wall time                 {elapsed:.2f} s")
        print(f"worker CPU (user+sys)            {cpu:.2f} s")
        print(f"AWS API calls                    {total}  ({total / launches:.2f} per launch)")
        print_calls(calls, launches)
        print(f"worker peak RSS                  {peak_kib / 1024:.1f} MiB")
        print(f"idle daemon RSS                  {idle_rss / 1024:.1f} MiB")
        return {"launches": launches, "seconds_to_last_completion": round(last_done - start, 2),
                "calls_per_launch": round(total / launches, 3), "peak_rss_mib": round(peak_kib / 1024, 1),
                "idle_rss_mib": round(idle_rss / 1024, 1)}
    finally:
        aws.stop()


if __name__ == "__main__":
    main()

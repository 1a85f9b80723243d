"""The demo: an emulated AWS account with a queue, a group and lifecycle hooks; the
provision daemon configures three launches and one termination while you watch. Run as root,
it also configures three simulated instances (each a real sshd in its own network namespace,
as the tests build them) with an `ansible` step: the main path, with its figures."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emu  # noqa: E402
import simhosts  # noqa: E402

BIN = os.path.join(emu.ROOT, "target/debug/provision")
WORK = os.path.join(emu.ROOT, ".demo")
GROUP = "web-demo"
APP = "app-demo"


def say(text):
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def wait(what, cond, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main():
    os.makedirs(WORK, exist_ok=True)
    state = os.path.join(WORK, "state.db")
    for f in (state, state + "-wal", state + "-shm"):
        if os.path.exists(f):
            os.remove(f)
    for d in ("ansible-logs", "known_hosts.d"):
        shutil.rmtree(os.path.join(WORK, d), ignore_errors=True)
    say("starting the AWS emulator (moto + lifecycle hooks) on 127.0.0.1")
    aws = emu.Emulator(os.path.join(WORK, "emulator.log"))
    daemon = None
    net = None
    try:
        url, arn = aws.queue("asg-lifecycle")
        topic, results_url = aws.topic_with_queue("provision-results")
        aws.group(GROUP)
        meta = {"environment": "demo", "platform": "web", "major": "3"}
        aws.hook(GROUP, "provision-launch", emu.LAUNCH, arn, heartbeat=120, metadata=meta)
        aws.hook(GROUP, "provision-terminate", emu.TERMINATE, arn, heartbeat=120)
        print(f"queue {url}\ngroup {GROUP} with launch and terminate hooks -> queue, metadata {json.dumps(meta)}")
        config = os.path.join(WORK, "provision.toml")
        extra = ""
        if os.geteuid() == 0:
            net = simhosts.Net()
            aws.group(APP, vpc_cidr=net.vpc_cidr, subnet_cidr=net.cidr)
            aws.hook(APP, "provision-launch", emu.LAUNCH, arn, heartbeat=300, metadata={"role": "api"})
            extra = ansible_config(net)
            print(f"group {APP} in {net.cidr}: its instances will be simulated hosts (sshd in network namespaces)")
        emu.write_config(config, url, state, topic_arn=topic, wait_time="2s", extra=extra)
        print(f"config {config}")

        say("starting `provision daemon` (its log follows)")
        env = {**aws.env(), "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3"}
        daemon = subprocess.Popen([BIN, "--config", config, "daemon"], env=env)

        say(f"scaling {GROUP} out to 3: new instances wait in Pending:Wait")
        aws.asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=3)
        for iid, st in aws.instances(GROUP).items():
            print(f"  {iid}  {st}")
        wait("3 instances InService", lambda: len(aws.instances(GROUP)) == 3
             and all(s == "InService" for s in aws.instances(GROUP).values()))
        say("every hook completed with CONTINUE; instances are InService and tagged")
        for iid, st in sorted(aws.instances(GROUP).items()):
            print(f"  {iid}  {st:10}  {aws.tags(iid)}")

        victim = sorted(aws.instances(GROUP))[0]
        say(f"terminating {victim}: it waits in Terminating:Wait for the decommission steps")
        aws.asg.terminate_instance_in_auto_scaling_group(InstanceId=victim, ShouldDecrementDesiredCapacity=True)
        print(f"  {victim}  {aws.instances(GROUP).get(victim)}")
        wait("the instance to leave the group", lambda: victim not in aws.instances(GROUP))
        state_name = aws.ec2.describe_instances(InstanceIds=[victim])["Reservations"][0]["Instances"][0]["State"]["Name"]
        print(f"  {victim}  {state_name}, tags {aws.tags(victim)}")

        if net is not None:
            ansible_part(aws, net)
        else:
            say("skipped: the ansible part")
            print("  An `ansible` step needs instances to reach over SSH; the demo simulates them as sshd\n"
                  "  processes in network namespaces, which only root may create. Run `sudo ./scripts/demo`\n"
                  "  to see three instances configured by one batched ansible-playbook run (Mitogen).")

        say("result events published to the SNS topic")
        time.sleep(1)
        for body in aws.drain(results_url):
            ev = json.loads(json.loads(body)["Message"])
            print(f"  {ev['instance_id']}  {ev['transition']:9}  {ev['outcome']:9}  hook {ev['hook_result']}")

        say("stopping the daemon (SIGTERM)")
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        daemon = None

        say("provision history")
        subprocess.run([BIN, "--config", config, "history"], env=aws.env(), check=True)
        print(f"\nDone. Files in {WORK}; try: {BIN} --config {config} history --json")
    finally:
        if daemon is not None:
            daemon.kill()
            daemon.wait()
        aws.stop()
        if net is not None:
            net.close()


def ansible_config(net):
    books = os.path.join(emu.ROOT, "tests/playbooks")
    sim_root = os.path.join(net.dir, "sim")
    os.makedirs(sim_root, exist_ok=True)
    return f'''
[ssh]
user = "root"
identity_file = "{net.client_key}"
connect_timeout = "3s"
ready_timeout = "60s"

[ansible]
playbook_dir = "{books}"
ansible_playbook = "{os.path.join(emu.ROOT, ".venv/bin/ansible-playbook")}"

[layers.app]
groups = ["app-*"]
vars = {{ role = "[a-z]{{1,16}}" }}
launch = [ {{ ansible = "marker.yml", vars = {{ role = "{{metadata.role}}", sim_root = "{sim_root}" }} }} ]
'''


def ansible_part(aws, net):
    say(f"scaling {APP} out to 3: each instance a simulated host, configured by an ansible step")
    aws.asg.set_desired_capacity(AutoScalingGroupName=APP, DesiredCapacity=3)
    sim_root = os.path.join(net.dir, "sim")
    for iid in sorted(aws.instances(APP)):
        ip = aws.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["PrivateIpAddress"]
        # cloud-init prints the host keys on the console: provision trusts those only.
        key = net.host(ip)
        aws.control("POST", f"/_emulator/console/{iid}", {"host_keys": [key]})
        os.makedirs(os.path.join(sim_root, iid), exist_ok=True)
        print(f"  {iid}  {ip}  sshd up, host key on the console")
    wait(f"3 {APP} instances InService", lambda: len(aws.instances(APP)) == 3
         and all(s == "InService" for s in aws.instances(APP).values()), timeout=180)
    say("the playbook ran once for the three; each wrote its marker through its own sshd")
    for iid in sorted(aws.instances(APP)):
        with open(os.path.join(sim_root, iid, "marker")) as f:
            print(f"  {iid}  " + " ".join(f.read().split()))
    actions = [a for a in aws.control("GET", "/_emulator/lifecycle")["actions"] if a["group"] == APP]
    first = min(a["created"] for a in actions)
    last = max(a["finished"] for a in actions if a["finished"])
    logs = sorted(os.listdir(os.path.join(WORK, "ansible-logs")))
    head = {}
    with open(os.path.join(WORK, "ansible-logs", logs[-1])) as f:
        for line in f:
            if not line.strip():
                break
            k, _, v = line.partition(": ")
            head[k] = v.strip()
    print(f"  first launch message -> last InService   {last - first:.1f} s")
    print(f"  ansible-playbook runs                    {len(logs)} (strategy {head.get('strategy')}, "
          f"pipelining {head.get('pipelining')}, {head.get('elapsed')} for the run)")
    print(f"  the run's full output                    {os.path.join(WORK, 'ansible-logs', logs[-1])}")


if __name__ == "__main__":
    main()

"""The demo: an emulated AWS account with a queue, a group and lifecycle hooks; the
provision daemon configures three launches and one termination while you watch."""

import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emu  # noqa: E402

BIN = os.path.join(emu.ROOT, "target/debug/provision")
WORK = os.path.join(emu.ROOT, ".demo")
GROUP = "web-demo"


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
    say("starting the AWS emulator (moto + lifecycle hooks) on 127.0.0.1")
    aws = emu.Emulator(os.path.join(WORK, "emulator.log"))
    daemon = None
    try:
        url, arn = aws.queue("asg-lifecycle")
        topic, results_url = aws.topic_with_queue("provision-results")
        aws.group(GROUP)
        meta = {"environment": "demo", "platform": "web", "major": "3"}
        aws.hook(GROUP, "provision-launch", emu.LAUNCH, arn, heartbeat=120, metadata=meta)
        aws.hook(GROUP, "provision-terminate", emu.TERMINATE, arn, heartbeat=120)
        print(f"queue {url}\ngroup {GROUP} with launch and terminate hooks -> queue, metadata {json.dumps(meta)}")
        config = os.path.join(WORK, "provision.toml")
        emu.write_config(config, url, state, topic_arn=topic, wait_time="2s")
        print(f"config {config}")

        say("starting `provision daemon` (its log follows)")
        daemon = subprocess.Popen([BIN, "--config", config, "daemon"], env=aws.env())

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


if __name__ == "__main__":
    main()

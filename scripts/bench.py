"""Benchmark: a burst of launches with one `tag` step against the emulator.

Prints figures, asserts nothing: wall time from first message to last completed hook, AWS API
calls per launch as counted by the emulator, peak RSS of the worker, idle RSS of the daemon.
Usage: bench.py BINARY [LAUNCHES]"""

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


def main():
    binary = sys.argv[1]
    launches = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    work = tempfile.mkdtemp(prefix="provision-bench-")
    aws = emu.Emulator(os.path.join(work, "emulator.log"))
    try:
        url, arn = aws.queue("asg-lifecycle")
        topic, results_url = aws.topic_with_queue("provision-results")
        aws.group("web-bench", max_size=launches + 10)
        aws.hook("web-bench", "provision-launch", emu.LAUNCH, arn, heartbeat=600,
                 metadata={"environment": "bench", "platform": "web", "major": "3"})
        config = os.path.join(work, "provision.toml")
        emu.write_config(config, url, os.path.join(work, "state.db"), topic_arn=topic, wait_time="1s")

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

        start = time.time()
        worker_log = os.path.join(work, "worker.log")
        worker = subprocess.Popen([binary, "--config", config, "--log-format", "json", "worker"], env=aws.env(),
                                  stderr=open(worker_log, "w"))
        _, status, usage = os.wait4(worker.pid, 0)
        worker.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.time() - start
        # The worker reports its own peak RSS (VmHWM) when it stops. (wait4's ru_maxrss would
        # count the pages of this Python process, forked before exec.)
        peak_kib = 0
        with open(worker_log) as f:
            for line in f:
                if '"stopped"' in line:
                    peak_kib = json.loads(line).get("peak_rss_kib", 0)
        calls = aws.control("GET", "/_emulator/calls")["calls"]
        actions = aws.control("GET", "/_emulator/lifecycle")["actions"]
        done = [a for a in actions if a["state"] == "finished"]
        continued = [a for a in done if a["result"] == "CONTINUE" and a["finished_by"] == "complete"]
        first_msg = min(a["created"] for a in actions)
        last_done = max(a["finished"] for a in done) if done else float("nan")
        total = sum(calls.values())

        print(f"launches                         {launches}")
        print(f"worker exit status               {worker.returncode}")
        print(f"hooks completed with CONTINUE    {len(continued)}/{launches}")
        print(f"emulator scale-out (not ours)    {scale_out:.1f} s")
        print(f"worker start -> last completion  {last_done - start:.2f} s")
        print(f"first message -> last completion {last_done - first_msg:.2f} s")
        print(f"worker wall time                 {elapsed:.2f} s")
        print(f"worker CPU (user+sys)            {usage.ru_utime + usage.ru_stime:.2f} s")
        print(f"AWS API calls                    {total}  ({total / launches:.2f} per launch)")
        for k, v in sorted(calls.items(), key=lambda kv: -kv[1]):
            print(f"    {k:40} {v:6}  ({v / launches:.3f} per launch)")
        print(f"worker peak RSS                  {peak_kib / 1024:.1f} MiB")
        print(f"idle daemon RSS                  {idle_rss / 1024:.1f} MiB")
        print(json.dumps({"launches": launches, "seconds_to_last_completion": round(last_done - start, 2),
                          "calls_per_launch": round(total / launches, 3),
                          "peak_rss_mib": round(peak_kib / 1024, 1),
                          "idle_rss_mib": round(idle_rss / 1024, 1)}))
    finally:
        aws.stop()


if __name__ == "__main__":
    main()

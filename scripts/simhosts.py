"""Simulated EC2 instances for the demo, built as the tests build them (tests/common/hosts.rs):
one network namespace per instance holding its private IP, with a real sshd on port 22, on a
bridge that holds the /24's .1 in this machine's namespace. Needs root.

The /24 is one of the tests' slots (10.S.T.0/24, S in 210..249), owned through an exclusive
flock on /run/provision-simhosts/10.S.T.0.lock, so the demo and test runs never collide.
Everything is removed by close(): sshd stopped, namespaces, veths and bridge deleted, the slot
released.
"""

import fcntl
import os
import random
import shutil
import subprocess
import tempfile
import time

LOCK_DIR = "/run/provision-simhosts"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True).stdout


def _in_use():
    text = _ip("-o", "-4", "addr", "show") + _ip("-4", "route", "show", "table", "all")
    return text


def _keygen(path, comment):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True)
    with open(path + ".pub") as f:
        return f.read().strip()


class Net:
    """A private /24 with a bridge and a client key; hosts are added with host(ip)."""

    def __init__(self):
        os.makedirs(LOCK_DIR, exist_ok=True)
        os.makedirs("/run/sshd", exist_ok=True)
        used = _in_use()
        start = random.randrange(40 * 256)
        for k in range(40 * 256):
            i = (start + k) % (40 * 256)
            s, t = 210 + i // 256, i % 256
            prefix = f"10.{s}.{t}."
            if prefix in used:
                continue
            lock = open(os.path.join(LOCK_DIR, f"10.{s}.{t}.0.lock"), "a+")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                continue
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            self.lock, self.s, self.t = lock, s, t
            break
        else:
            raise SystemExit("simhosts: no free /24 in 10.210.0.0-10.249.255.0")
        self.bridge = f"psb-{self.s}-{self.t}"
        self.hosts = []
        self.dir = tempfile.mkdtemp(prefix=f"provsim-{os.getpid()}-demo-")
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.prefix}1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.client_key = os.path.join(self.dir, "client_ed25519")
        self.client_public_key = _keygen(self.client_key, "provision-demo")

    @property
    def prefix(self):
        return f"10.{self.s}.{self.t}."

    @property
    def cidr(self):
        return f"{self.prefix}0/24"

    @property
    def vpc_cidr(self):
        return f"10.{self.s}.0.0/16"

    def host(self, ip):
        """Starts a namespace at `ip` with sshd accepting the client key; returns its public
        host key line (for the console output)."""
        last = ip.rsplit(".", 1)[1]
        netns, veth = f"psim-10-{self.s}-{self.t}-{last}", f"psv-{self.s}-{self.t}-{last}"
        d = os.path.join(self.dir, ip)
        os.makedirs(d)
        key = os.path.join(d, "ssh_host_ed25519_key")
        public = _keygen(key, f"root@ip-{ip.replace('.', '-')}")
        ak = os.path.join(d, "authorized_keys")
        with open(ak, "w") as f:
            f.write(self.client_public_key + "\n")
        os.chmod(ak, 0o600)
        config = os.path.join(d, "sshd_config")
        with open(config, "w") as f:
            f.write(f"ListenAddress {ip}:22\nHostKey {key}\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {ak}\n"
                    "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\nUseDNS no\nPrintMotd no\n"
                    "MaxStartups 100:30:200\nSubsystem sftp internal-sftp\n")
        self.hosts.append((netns, veth, None))
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        log = os.path.join(d, "sshd.log")
        sshd = subprocess.Popen(["ip", "netns", "exec", netns, "/usr/sbin/sshd", "-D", "-e", "-f", config],
                                stdin=subprocess.DEVNULL, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.hosts[-1] = (netns, veth, sshd)
        deadline = time.time() + 15
        while time.time() < deadline:
            with open(log) as f:
                if f"Server listening on {ip} port 22" in f.read():
                    return public
            if sshd.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"simhosts: sshd for {ip} did not start: {open(log).read()}")

    def close(self):
        for netns, veth, sshd in self.hosts:
            if sshd is not None:
                sshd.terminate()
                try:
                    sshd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    sshd.kill()
                    sshd.wait()
            for pid in _ip("netns", "pids", netns, check=False).split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "delete", netns, check=False)
            _ip("link", "delete", veth, check=False)
        _ip("link", "delete", self.bridge, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.remove(self.lock.name)
        except OSError:
            pass
        self.lock.close()

"""EC2 GetConsoleOutput with real SSH host keys, for the emulator (emulator.py routes requests here).

moto answers GetConsoleOutput with one canned kernel log for every instance. A test that
simulates an instance (a network namespace with a real sshd, tests/common/hosts.rs) registers
that instance's host keys here; GetConsoleOutput for the instance then returns a console log as
cloud-init writes it on first boot:

    boot lines (kernel, cloud-init init-local / init, ci-info tables with the private IP)
    <14>Nov 22 02:20:06 cloud-init: #############################################################
    <14>Nov 22 02:20:06 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----
    <14>Nov 22 02:20:06 cloud-init: 256 SHA256:<base64, no padding> root@ip-10-0-0-4 (ED25519)
    <14>Nov 22 02:20:06 cloud-init: -----END SSH HOST KEY FINGERPRINTS-----
    <14>Nov 22 02:20:06 cloud-init: #############################################################
    -----BEGIN SSH HOST KEY KEYS-----
    ssh-ed25519 AAAA... root@ip-10-0-0-4
    -----END SSH HOST KEY KEYS-----
    <extra>
    [    9.876543] cloud-init[612]: Cloud-init v. 22.4.2 finished at ...
    Debian GNU/Linux 12 ip-10-0-0-4 ttyS0

This is what cloud-init's ``write-ssh-key-fingerprints`` helper (cc_keys_to_console) prints:
the fingerprint block goes through ``logger -t cloud-init`` (hence the ``<14>date tag:``
prefix on the console), the key block is written straight to the console. The fingerprint
lines are ``ssh-keygen -l`` output (bits, SHA256 fingerprint, comment, type), computed here
from the registered keys; a key without a comment gets ``no comment``, as ssh-keygen prints.

Until ``appear_after_seconds`` (counted from registration) have passed, the log has only the
boot lines (cloud-init has not reached the final stage yet); afterwards it has the blocks, then
``extra`` (free text, e.g. a forged second block printed later by something on the instance),
then the final lines. An empty ``host_keys`` list prints no blocks at all (as with
``ssh: emit_keys_to_console: false``) but still appends ``extra`` once the delay has passed.

GetConsoleOutput's ``Latest=true`` answers the console as it is now; without it, the answer is
the buffer EC2 posts after state transitions, modelled as the console ``buffered_lag_seconds``
ago (default 0: no lag). ``latest_supported: false`` (an instance type off Nitro) answers
``Latest=true`` with UnsupportedOperation.

A registration can also be made for a private IP before any instance has it (a benchmark that
starts its hosts first, then scales a group out, and whose instances must show their keys
from their first GetConsoleOutput): it serves every instance at that address that has no
registration of its own.

Request handling: an EC2 query-protocol request with Action=GetConsoleOutput for a registered
instance (by its id, or else by its private IP) that moto knows (in the request's account and
region) is answered here; everything else (unregistered instances keep moto's canned log;
unknown instances get moto's InvalidInstanceID.NotFound) goes on to moto.

Control endpoints (JSON), served through ``control()``:
    GET    /_emulator/console                    {"instances": {"i-...": {registration}},
                                                  "addresses": {"10.0.1.4": {registration}}}
    GET    /_emulator/console/<instance-id>      the registration and the output as rendered now
    POST   /_emulator/console/<instance-id>      {"host_keys": ["ssh-ed25519 AAAA... root@h"],
                                                  "appear_after_seconds": 0,
                                                  "extra": "text after the blocks",
                                                  "crlf": false,   (true: lines end in \\r\\n)
                                                  "buffered_lag_seconds": 0,
                                                  "latest_supported": true}
                                                 replaces any earlier registration
    DELETE /_emulator/console/<instance-id>      forget it (moto's canned log again)
    POST   /_emulator/console/address/<ipv4>     the same body, for instances at that private IP
    DELETE /_emulator/console/address/<ipv4>     forget it
POST /moto-api/reset forgets every registration.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import ipaddress
import json
import re
import struct
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from aws_scope import DEFAULT_ACCOUNT, DEFAULT_REGION  # noqa: E402,F401
from aws_scope import scope as _scope  # noqa: E402
EC2_NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"
INSTANCE_ID_PATTERN = re.compile(r"^i-[0-9a-f]{8,17}$")
CLOUD_INIT_VERSION = "22.4.2"
RULE = "#" * 61
BOOT_SECONDS = 6.0

_LOCK = threading.RLock()
# instance id -> {"host_keys": [...], "appear_after_seconds": float, "extra": str,
#                 "crlf": bool, "registered": epoch seconds}
REGISTRATIONS: dict[str, dict[str, Any]] = {}
# private IP -> a registration, for the instances at that address without one of their own
ADDRESSES: dict[str, dict[str, Any]] = {}


class ConsoleError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# host keys
# --------------------------------------------------------------------------------------------

_KEY_TYPES = {
    "ssh-ed25519": "ED25519",
    "ecdsa-sha2-nistp256": "ECDSA",
    "ecdsa-sha2-nistp384": "ECDSA",
    "ecdsa-sha2-nistp521": "ECDSA",
    "ssh-rsa": "RSA",
    "ssh-dss": "DSA",
}


def _read_string(blob: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 4 > len(blob):
        raise ConsoleError("truncated key blob")
    (length,) = struct.unpack(">I", blob[offset:offset + 4])
    end = offset + 4 + length
    if end > len(blob):
        raise ConsoleError("truncated key blob")
    return blob[offset + 4:end], end


def _parse_key(line: Any) -> tuple[str, bytes, str]:
    """(type, blob, comment) of an OpenSSH public key line; checks the blob names its type."""
    if not isinstance(line, str) or "\n" in line or "\r" in line:
        raise ConsoleError("each host key must be one line of text")
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise ConsoleError(f"not an OpenSSH public key line: {line!r}")
    key_type, data = parts[0], parts[1]
    comment = parts[2] if len(parts) > 2 else ""
    if key_type not in _KEY_TYPES:
        raise ConsoleError(f"unsupported host key type {key_type!r} (one of {', '.join(_KEY_TYPES)})")
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ConsoleError(f"host key is not valid base64: {line!r}") from None
    inner, _ = _read_string(blob, 0)
    if inner.decode("ascii", "replace") != key_type:
        raise ConsoleError(f"host key blob is of type {inner!r}, the line says {key_type!r}")
    return key_type, blob, comment


def _bits(key_type: str, blob: bytes) -> int:
    if key_type == "ssh-ed25519":
        return 256
    if key_type.startswith("ecdsa-sha2-nistp"):
        return int(key_type[len("ecdsa-sha2-nistp"):])
    _, offset = _read_string(blob, 0)
    if key_type == "ssh-rsa":
        _, offset = _read_string(blob, offset)  # e
        n, _ = _read_string(blob, offset)
        return int.from_bytes(n, "big").bit_length()
    p, _ = _read_string(blob, offset)  # ssh-dss
    return int.from_bytes(p, "big").bit_length()


def fingerprint_line(line: str) -> str:
    """``ssh-keygen -l -f key.pub`` for one public key line."""
    key_type, blob, comment = _parse_key(line)
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"{_bits(key_type, blob)} SHA256:{digest} {comment or 'no comment'} ({_KEY_TYPES[key_type]})"


# --------------------------------------------------------------------------------------------
# the console log
# --------------------------------------------------------------------------------------------


def _instance(account: str, region: str, instance_id: str) -> Any:
    """moto's instance, or None when moto does not know it there."""
    try:
        from moto.ec2.models import ec2_backends

        return ec2_backends[account][region].get_instance(instance_id)
    except Exception:
        return None


def _syslog_time(t: float) -> str:
    return time.strftime("%b %e %H:%M:%S", time.gmtime(t))


def _long_time(t: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(t))


def render(instance_id: str, reg: dict[str, Any], private_ip: str | None, now: float) -> tuple[str, float]:
    """(console text, time of its last line) for a registration at time ``now``."""
    ip = private_ip or "10.0.0.4"
    host = "ip-" + ip.replace(".", "-")
    # The instance booted BOOT_SECONDS before its registration (the test registers the keys of
    # a running host); the blocks are printed `delay` seconds after registration.
    delay = reg["appear_after_seconds"]
    at = reg["registered"] + delay
    booted = reg["registered"] - BOOT_SECONDS
    shown = now >= at
    final_up = BOOT_SECONDS + delay + 0.35
    mac = "02:" + ":".join(f"{b:02x}" for b in hashlib.sha256(instance_id.encode()).digest()[:5])
    netmask = "255.255.255.0"

    def k(up: float, text: str) -> str:
        return f"[{up:12.6f}] {text}"

    lines = [
        k(0, "Linux version 6.1.0-28-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian "
             "12.2.0-14) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC "
             "Debian 6.1.119-1 (2024-11-22)"),
        k(0, "Command line: BOOT_IMAGE=/boot/vmlinuz-6.1.0-28-cloud-amd64 "
             "root=PARTUUID=6d4b5d4e-7f0b-4b4a-9d3c-0a1b2c3d4e5f ro console=tty0 console=ttyS0,115200 "
             "earlyprintk=ttyS0,115200 consoleblank=0"),
        k(0, "BIOS-provided physical RAM map:"),
        k(0, "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        k(0, "BIOS-e820: [mem 0x0000000000100000-0x000000003ffe7fff] usable"),
        k(0, "DMI: Amazon EC2 t3.micro/, BIOS 1.0 10/16/2017"),
        k(0, "Hypervisor detected: KVM"),
        k(0.412031, "ena 0000:00:05.0: Elastic Network Adapter (ENA) v2.8.0g"),
        k(0.891224, "EXT4-fs (nvme0n1p1): mounted filesystem with ordered data mode. Quota mode: none."),
        k(1.102937, "systemd[1]: systemd 252.33-1~deb12u1 running in system mode"),
        k(1.134002, f"systemd[1]: Hostname set to <{host}>."),
        k(2.301455, f"cloud-init[312]: Cloud-init v. {CLOUD_INIT_VERSION} running 'init-local' at "
                    f"{_long_time(booted + 2.3)}. Up 2.30 seconds."),
        k(3.402118, f"cloud-init[345]: Cloud-init v. {CLOUD_INIT_VERSION} running 'init' at "
                    f"{_long_time(booted + 3.4)}. Up 3.40 seconds."),
        k(3.412604, "cloud-init[345]: ci-info: ++++++++++++++++++++++++++++++++++++++Net device "
                    "info+++++++++++++++++++++++++++++++++++++++"),
        k(3.412911, "cloud-init[345]: ci-info: +--------+------+------------------------------+"
                    "---------------+--------+-------------------+"),
        k(3.413130, "cloud-init[345]: ci-info: | Device |  Up  |           Address            |"
                    "      Mask     | Scope  |     Hw-Address    |"),
        k(3.413402, "cloud-init[345]: ci-info: +--------+------+------------------------------+"
                    "---------------+--------+-------------------+"),
        k(3.413688, f"cloud-init[345]: ci-info: |  ens5  | True | {ip:<28} | {netmask:<13} | global "
                    f"| {mac} |"),
        k(3.413925, f"cloud-init[345]: ci-info: |   lo   | True | {'127.0.0.1':<28} | {'255.0.0.0':<13} "
                    f"|  host  |         .         |"),
        k(3.414227, "cloud-init[345]: ci-info: +--------+------+------------------------------+"
                    "---------------+--------+-------------------+"),
        k(3.921730, "cloud-init[345]: Generating public/private ed25519 key pair."),
        k(3.922016, "cloud-init[345]: Your identification has been saved in /etc/ssh/ssh_host_ed25519_key"),
        k(3.922301, "cloud-init[345]: Your public key has been saved in /etc/ssh/ssh_host_ed25519_key.pub"),
        k(4.610562, f"cloud-init[401]: Cloud-init v. {CLOUD_INIT_VERSION} running 'modules:config' at "
                    f"{_long_time(booted + 4.6)}. Up 4.61 seconds."),
    ]
    last = booted + 4.6
    if shown:
        stamp = f"<14>{_syslog_time(at)} cloud-init: "
        keys = reg["host_keys"]
        lines.append("ci-info: no authorized SSH keys fingerprints found for user admin.")
        if keys:
            lines.append(stamp + RULE)
            lines.append(stamp + "-----BEGIN SSH HOST KEY FINGERPRINTS-----")
            lines.extend(stamp + fingerprint_line(key) for key in keys)
            lines.append(stamp + "-----END SSH HOST KEY FINGERPRINTS-----")
            lines.append(stamp + RULE)
            lines.append("-----BEGIN SSH HOST KEY KEYS-----")
            lines.extend(key.strip() for key in keys)
            lines.append("-----END SSH HOST KEY KEYS-----")
        extra = reg["extra"]
        if extra:
            lines.extend(extra.rstrip("\n").split("\n"))
        lines.append(k(final_up, f"cloud-init[612]: Cloud-init v. {CLOUD_INIT_VERSION} finished at "
                                 f"{_long_time(at)}. Datasource DataSourceEc2Local.  Up {final_up:.2f} "
                                 "seconds"))
        lines.append("")
        lines.append(f"Debian GNU/Linux 12 {host} ttyS0")
        lines.append("")
        lines.append(f"{host} login: ")
        last = at
    eol = "\r\n" if reg.get("crlf") else "\n"
    return eol.join(lines), last


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# --------------------------------------------------------------------------------------------
# entry points used by emulator.py
# --------------------------------------------------------------------------------------------


def _params(environ: dict[str, Any], body: bytes) -> dict[str, str]:
    params = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}
    if body and "json" not in environ.get("CONTENT_TYPE", ""):
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            form = {}
        params.update({k: v[0] for k, v in form.items()})
    return params


def dispatch(environ: dict[str, Any], body: bytes) -> tuple[str, list[tuple[str, str]], bytes] | None:
    """Answer GetConsoleOutput for a registered instance; None for every other request."""
    if environ.get("HTTP_X_AMZ_TARGET"):
        return None
    if b"GetConsoleOutput" not in body and "GetConsoleOutput" not in environ.get("QUERY_STRING", ""):
        return None
    params = _params(environ, body)
    if params.get("Action") != "GetConsoleOutput":
        return None
    instance_id = params.get("InstanceId", "")
    account, region = _scope(environ)
    instance = _instance(account, region, instance_id)
    if instance is None:
        return None  # moto answers InvalidInstanceID.NotFound (or its canned log)
    with _LOCK:
        reg = REGISTRATIONS.get(instance_id) or ADDRESSES.get(getattr(instance, "private_ip", None) or "")
        if reg is None:
            return None
        reg = dict(reg)
    # Latest=true: the console as it is now, on instances that support it (Nitro); without
    # it, the buffer EC2 posted, which lags `buffered_lag_seconds` behind.
    latest = params.get("Latest", "").lower() == "true"
    if latest and not reg["latest_supported"]:
        return _error("UnsupportedOperation",
                      "The instance type does not support retrieving the latest console output.")
    now = time.time() if latest else time.time() - reg["buffered_lag_seconds"]
    text, last = render(instance_id, reg, getattr(instance, "private_ip", None), now)
    request_id = str(uuid.uuid4())
    output = base64.b64encode(text.encode("utf-8")).decode("ascii")
    payload = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<GetConsoleOutputResponse xmlns="{EC2_NAMESPACE}">'
        f"<requestId>{request_id}</requestId>"
        f"<instanceId>{instance_id}</instanceId>"
        f"<timestamp>{_iso(last)}</timestamp>"
        f"<output>{output}</output>"
        "</GetConsoleOutputResponse>"
    ).encode()
    headers = [("Content-Type", "text/xml;charset=UTF-8"), ("x-amzn-RequestId", request_id),
               ("Content-Length", str(len(payload)))]
    return "200 OK", headers, payload


def _error(code: str, message: str) -> tuple[str, list[tuple[str, str]], bytes]:
    request_id = str(uuid.uuid4())
    payload = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
        f"<RequestID>{request_id}</RequestID></Response>"
    ).encode()
    return "400 Bad Request", [("Content-Type", "text/xml;charset=UTF-8"),
                               ("Content-Length", str(len(payload)))], payload


def _validated(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise ConsoleError("body must be a JSON object")
    unknown = set(spec) - {"host_keys", "appear_after_seconds", "extra", "crlf", "buffered_lag_seconds",
                           "latest_supported"}
    if unknown:
        raise ConsoleError(f"unknown fields: {', '.join(sorted(unknown))}")
    keys = spec.get("host_keys", [])
    if not isinstance(keys, list):
        raise ConsoleError("host_keys must be a list of public key lines")
    for key in keys:
        _parse_key(key)
    delay = spec.get("appear_after_seconds", 0)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < 1e9:
        raise ConsoleError("appear_after_seconds must be a number >= 0")
    extra = spec.get("extra", "")
    if not isinstance(extra, str):
        raise ConsoleError("extra must be a string")
    crlf = spec.get("crlf", False)
    if not isinstance(crlf, bool):
        raise ConsoleError("crlf must be true or false")
    lag = spec.get("buffered_lag_seconds", 0)
    if isinstance(lag, bool) or not isinstance(lag, (int, float)) or not 0 <= lag < 1e9:
        raise ConsoleError("buffered_lag_seconds must be a number >= 0")
    latest_supported = spec.get("latest_supported", True)
    if not isinstance(latest_supported, bool):
        raise ConsoleError("latest_supported must be true or false")
    return {"host_keys": [k.strip() for k in keys], "appear_after_seconds": float(delay),
            "extra": extra, "crlf": crlf, "buffered_lag_seconds": float(lag),
            "latest_supported": latest_supported, "registered": time.time()}


def _public(reg: dict[str, Any]) -> dict[str, Any]:
    return {**reg, "appears_at": reg["registered"] + reg["appear_after_seconds"]}


def control(method: str, path: str, body: bytes) -> tuple[str, Any] | None:
    """The /_emulator/console endpoints; None for other paths."""
    if path == "/_emulator/console":
        if method != "GET":
            return "405 Method Not Allowed", {"error": f"{method} {path}: use GET"}
        with _LOCK:
            return "200 OK", {"instances": {i: _public(r) for i, r in REGISTRATIONS.items()},
                              "addresses": {a: _public(r) for a, r in ADDRESSES.items()}}
    prefix = "/_emulator/console/"
    if not path.startswith(prefix):
        return None
    if path.startswith(prefix + "address/"):
        return _control_address(method, path[len(prefix + "address/"):], body)
    instance_id = path[len(prefix):]
    if not INSTANCE_ID_PATTERN.match(instance_id):
        return "400 Bad Request", {"error": f"not an EC2 instance id: {instance_id!r}"}
    with _LOCK:
        if method == "POST":
            try:
                reg = _validated(json.loads(body or b"{}"))
            except (ValueError, ConsoleError) as exc:
                return "400 Bad Request", {"error": str(exc)}
            REGISTRATIONS[instance_id] = reg
            return "200 OK", {"instance_id": instance_id, **_public(reg)}
        if method == "DELETE":
            REGISTRATIONS.pop(instance_id, None)
            return "200 OK", {"instance_id": instance_id}
        if method == "GET":
            reg = REGISTRATIONS.get(instance_id)
            if reg is None:
                return "404 Not Found", {"error": f"nothing registered for {instance_id}"}
            private_ip = None
            try:
                from moto.ec2.models import ec2_backends

                for _, _, backend in ec2_backends.iter_backends():  # only backends in use
                    inst = backend.get_instance_by_id(instance_id)
                    if inst is not None:
                        private_ip = inst.private_ip
            except Exception:
                pass
            text, _ = render(instance_id, reg, private_ip, time.time())
            return "200 OK", {"instance_id": instance_id, **_public(reg), "output": text}
    return "405 Method Not Allowed", {"error": f"{method} {path}: use GET, POST or DELETE"}


def _control_address(method: str, address: str, body: bytes) -> tuple[str, Any]:
    """POST / DELETE /_emulator/console/address/<ipv4>."""
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        return "400 Bad Request", {"error": f"not an IPv4 address: {address!r}"}
    with _LOCK:
        if method == "POST":
            try:
                reg = _validated(json.loads(body or b"{}"))
            except (ValueError, ConsoleError) as exc:
                return "400 Bad Request", {"error": str(exc)}
            ADDRESSES[address] = reg
            return "200 OK", {"address": address, **_public(reg)}
        if method == "DELETE":
            ADDRESSES.pop(address, None)
            return "200 OK", {"address": address}
    return "405 Method Not Allowed", {"error": f"{method}: use POST or DELETE"}


def reset() -> None:
    """POST /moto-api/reset."""
    with _LOCK:
        REGISTRATIONS.clear()
        ADDRESSES.clear()

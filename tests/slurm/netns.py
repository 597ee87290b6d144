"""Throw-away "hosts" on this machine for multi-node tests: network namespaces on a private bridge.

    with Hosts(["mnode1", "mnode2"]) as h:
        h.nodes        # [(name, address, netns)] for SlurmCluster(nodes=...)
        h.ctl_addr     # this (root) namespace's address on the bridge: slurmctld is reached there
        h.ifname       # the interface name inside every namespace (GLOO_SOCKET_IFNAME)
        h.rx_bytes(name)

A bridge in the root namespace with a private /24 (10.x, unused by any route here) and one veth pair per
host: the root end on the bridge, the other end moved into the host's namespace (same name in every
namespace), plus its own loopback. Nothing is routed outside the bridge. Host names resolve through
/etc/netns/<ns>/hosts, bind-mounted over /etc/hosts by ``in_netns`` for the daemons started there.
Everything is removed on exit. ``why_not()`` says why this machine cannot do it (not root, no
``ip``/``nsenter``/``unshare``, namespaces or mounts not permitted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

IFNAME = "mnet0"


def ip(*args, check=True, netns=None) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def in_netns(netns: str, cmd: list) -> list:
    """``cmd`` in network namespace ``netns`` with /etc/netns/<netns>/hosts as /etc/hosts. Unlike
    ``ip netns exec`` it leaves /sys as it is (``ip netns exec`` remounts it, and slurmd then fails with
    "No filesystem mounted on /sys/fs/cgroup ... Unable to initialize cgroup plugin")."""
    hosts = Path("/etc/netns") / netns / "hosts"
    return ["nsenter", f"--net=/run/netns/{netns}", "unshare", "--mount", "--propagation", "private",
            "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$@"', "sh", *map(str, cmd)]


def _free_subnet() -> str:
    """A 10.x.y.0/24 prefix no route here uses."""
    routes = ip("-4", "route", "show", "table", "all").stdout + ip("-4", "addr").stdout
    for y in range(77, 255):
        prefix = f"10.{y}.{os.getpid() % 250}"
        if prefix + "." not in routes:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 subnet")


def why_not() -> str | None:
    """``None`` when network namespaces, veth pairs and a bridge can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_SYS_ADMIN/CAP_NET_ADMIN"
    for tool in ("ip", "nsenter", "unshare"):
        if not shutil.which(tool):
            return f"no `{tool}` command"
    probe = f"mnprobe{os.getpid()}"
    try:
        for args in (("netns", "add", probe), ("link", "add", f"{probe[:11]}b", "type", "bridge"),
                     ("link", "add", f"{probe[:11]}v", "type", "veth", "peer", "name", f"{probe[:11]}w")):
            p = ip(*args, check=False)
            if p.returncode != 0:
                return f"`ip {' '.join(args)}` is not permitted here: {p.stderr.strip()}"
        (Path("/etc/netns") / probe).mkdir(parents=True, exist_ok=True)
        (Path("/etc/netns") / probe / "hosts").write_text("127.0.0.1 localhost\n")
        cmd = in_netns(probe, ["true"])
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            return f"`{' '.join(cmd[:6])} ...` is not permitted here: {p.stderr.strip()}"
    except OSError as e:
        return f"cannot write /etc/netns: {e}"
    finally:
        for link in ("b", "v"):
            ip("link", "del", f"{probe[:11]}{link}", check=False)
        ip("netns", "del", probe, check=False)
        shutil.rmtree(Path("/etc/netns") / probe, ignore_errors=True)
        _rmdir_if_empty(Path("/etc/netns"))
    return None


def _rmdir_if_empty(d: Path):
    try:
        d.rmdir()  # only when empty (no namespace of anyone else)
    except OSError:
        pass


class Hosts:
    def __init__(self, names: list[str]):
        tag = f"{os.getpid() % 100000}"
        self.names = list(names)
        self.bridge = f"mnbr{tag}"
        self.netns = {n: f"mn{tag}-{n}" for n in self.names}
        self.veth = {n: f"mnv{tag}x{i}" for i, n in enumerate(self.names)}
        self.ifname = IFNAME
        self.prefix = None
        self.addr: dict[str, str] = {}
        self.ctl_addr = None

    @property
    def nodes(self):
        return [(n, self.addr[n], self.netns[n]) for n in self.names]

    def __enter__(self):
        try:
            self._up()
        except BaseException:
            self._down()
            raise
        return self

    def __exit__(self, *exc):
        self._down()

    def _up(self):
        self.prefix = _free_subnet()
        self.ctl_addr = f"{self.prefix}.1"
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.ctl_addr}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, n in enumerate(self.names):
            ns, veth, self.addr[n] = self.netns[n], self.veth[n], f"{self.prefix}.{i + 2}"
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            ip("link", "set", veth, "master", self.bridge)
            ip("link", "set", veth, "up")
            ip("link", "set", f"{veth}p", "netns", ns)
            ip("link", "set", f"{veth}p", "name", self.ifname, netns=ns)
            ip("addr", "add", f"{self.addr[n]}/24", "dev", self.ifname, netns=ns)
            ip("link", "set", self.ifname, "up", netns=ns)
            ip("link", "set", "lo", "up", netns=ns)
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.addr[n]} {n}\n" for n in self.names)
        for n in self.names:
            d = Path("/etc/netns") / self.netns[n]
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(hosts)

    def _down(self):
        for n in self.names:
            ip("netns", "del", self.netns[n], check=False)  # removes the veth pair with it
            ip("link", "del", self.veth[n], check=False)
            shutil.rmtree(Path("/etc/netns") / self.netns[n], ignore_errors=True)
        ip("link", "del", self.bridge, check=False)
        _rmdir_if_empty(Path("/etc/netns"))

    def rx_bytes(self, name: str) -> int:
        """Bytes received so far on the host's bridge interface."""
        p = ip("-s", "-j", "link", "show", self.ifname, netns=self.netns[name])
        return int(json.loads(p.stdout)[0]["stats64"]["rx"]["bytes"])

"""Hosts on one machine: Linux network namespaces joined by veth pairs to a bridge (root and `ip` required).

Each host is a namespace with one interface (`eth0`) and an address of its own on a /24 picked for the run;
the bridge sits in the root namespace with the subnet's last address, so this machine reaches every host
(it plays the client's host). Names carry a run id, so runs side by side never clash; the bridge's alias
names the owning process, so a later run removes what a killed one left behind (`sweep`).

Faults, as a network would make them: a host's link down (a partition), or packets from one host to one
address dropped by an nftables rule inside the host's namespace (the rest of the network still answers).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

_ALIAS = "meshserve-hosts pid="
_PREFIX = "msh"  # of every bridge, veth and namespace name: interface names hold 15 characters at most
_TABLE = "meshserve"  # the nftables table of a host's drop rules


class NetnsError(Exception):
    """A namespace, link or rule could not be made; the message carries the command and its error."""


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str | None:
    """Why hosts cannot be made here (not root, no `ip`), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


def filtering_unavailable() -> str | None:
    """Why drop rules cannot be set in a namespace here (no `nft`: apt-get install nftables), or None."""
    return None if shutil.which("nft") else "nftables is not installed (apt-get install nftables)"


@dataclass(frozen=True)
class Host:
    name: str  # what it runs: etcd, store, node-0, ...
    namespace: str
    address: str
    veth: str  # the pair's end on the bridge, in the root namespace

    def wrap(self) -> list[str]:
        """Prefix of a command that runs on this host."""
        return ["ip", "netns", "exec", self.namespace]


class Network:
    def __init__(self, run: str, bridge: str, gateway: str, hosts: dict[str, Host]) -> None:
        self.run = run
        self.bridge = bridge
        self.gateway = gateway  # this machine's address on the bridge
        self.hosts = hosts

    @classmethod
    def create(cls, names: Sequence[str]) -> Network:
        """A bridge and one host per name, addressed .1, .2, ... in their order; all removed on failure."""
        if reason := unavailable():
            raise NetnsError(reason)
        sweep()
        run = secrets.token_hex(3)
        subnet = _free_subnet()
        bridge = f"{_PREFIX}{run}"
        gateway = str(subnet.network_address + 254)
        network = cls(run, bridge, gateway, {})
        try:
            _run("ip", "link", "add", bridge, "type", "bridge")
            _run("ip", "link", "set", bridge, "alias", f"{_ALIAS}{os.getpid()}")
            _run("ip", "addr", "add", f"{gateway}/24", "dev", bridge)
            _run("ip", "link", "set", bridge, "up")
            for i, name in enumerate(names):
                network.hosts[name] = network._add_host(i, name, str(subnet.network_address + i + 1))
        except BaseException:
            network.close()
            raise
        return network

    def _add_host(self, i: int, name: str, address: str) -> Host:
        host = Host(name, f"{self.bridge}-{name}", address, f"{self.bridge}v{i}")
        _run("ip", "netns", "add", host.namespace)
        # The pair is born with one end in the namespace, so its `eth0` never meets the machine's own.
        _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
        _run("ip", "link", "set", host.veth, "master", self.bridge, "up")
        _run("ip", "-n", host.namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        for device in ("lo", "eth0"):
            _run("ip", "-n", host.namespace, "link", "set", device, "up")
        return host

    def cut(self, name: str) -> None:
        """The host's link down: it reaches nothing and nothing reaches it (its processes keep running)."""
        _run("ip", "-n", self.hosts[name].namespace, "link", "set", "eth0", "down")

    def reconnect(self, name: str) -> None:
        _run("ip", "-n", self.hosts[name].namespace, "link", "set", "eth0", "up")

    def block(self, name: str, address: str) -> None:
        """Drop every packet between host `name` and `address`, both ways (a silent network, as a partition).

        Both ways: with only the outgoing side dropped, data the other end pushes on an open connection (an
        etcd watch's events) still arrives until its TCP gives up, and the host half-learns what it cannot."""
        if reason := filtering_unavailable():
            raise NetnsError(reason)
        ns = self.hosts[name].namespace
        _run("ip", "netns", "exec", ns, "nft", "add", "table", "inet", _TABLE)
        for chain, hook, match in (("out", "output", "daddr"), ("in", "input", "saddr")):
            _run("ip", "netns", "exec", ns, "nft", "add", "chain", "inet", _TABLE, chain,
                 f"{{ type filter hook {hook} priority 0 ; }}")
            _run("ip", "netns", "exec", ns, "nft", "add", "rule", "inet", _TABLE, chain, "ip", match, address, "drop")

    def unblock(self, name: str) -> None:
        _run("ip", "netns", "exec", self.hosts[name].namespace, "nft", "delete", "table", "inet", _TABLE)

    def close(self) -> None:
        """Remove every link and namespace of the run; safe to call twice and after a half-made network."""
        _remove(self.bridge)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _links() -> list[dict[str, object]]:
    found: list[dict[str, object]] = json.loads(_run("ip", "-j", "-d", "link", "show") or "[]")
    return found


def _remove(bridge: str) -> None:
    # The veths first: a namespace's deletion frees its end of a pair only later, asynchronously.
    for link in _links():
        name = str(link.get("ifname", ""))
        if name.startswith(bridge):
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)
    for namespace in _run("ip", "netns", "list").split():
        if namespace.startswith(f"{bridge}-"):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


def sweep() -> None:
    """Remove the networks of runs whose process is gone (a test killed before its cleanup)."""
    for link in _links():
        alias = str(link.get("ifalias", ""))
        if alias.startswith(_ALIAS) and not _alive(int(alias.removeprefix(_ALIAS))):
            _remove(str(link["ifname"]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that no address of this machine is in (another run's bridge, a real network)."""
    taken = [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
             for link in json.loads(_run("ip", "-j", "addr", "show")) for a in link.get("addr_info", [])
             if a.get("family") == "inet"]
    rng = random.Random(secrets.randbits(64))
    for _ in range(100):
        subnet = ipaddress.IPv4Network(f"10.{rng.randrange(200, 208)}.{rng.randrange(256)}.0/24")
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise NetnsError("no free /24 in 10.200.0.0/13")


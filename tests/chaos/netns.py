"""A private network of namespaces, so a test can partition its own processes and nothing else.

Layout: a hub namespace holds a bridge; each member has a namespace of its own, joined to the
bridge by a veth pair, with one address of a /24 that no route of this machine uses; the root
namespace joins the bridge too (``.1``), so the test process reaches every member's endpoints
even while members are cut off from each other. A partition is a pair of blackhole routes (in
the member's namespace towards each peer, and in each peer's towards it): iproute2 alone, no
firewall, nothing outside these namespaces touched. ``remove`` deletes the namespaces, which
takes every veth with them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import secrets
import subprocess

import pytest


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        pytest.fail("`ip` (iproute2) is not installed", pytrace=False)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(command)}: {done.stderr.strip()}", pytrace=False)
    return done.stdout


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps no route of the root namespace."""
    routes = []
    for line in ip("-4", "route", "show", "table", "all").splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("broadcast", "local", "unreachable", "blackhole"):
            word = line.split()[1]
        with contextlib.suppress(ValueError):
            routes.append(ipaddress.ip_network("0.0.0.0/0" if word == "default" else word, False))
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(r) for r in routes if r.prefixlen > 0):
            return net
    pytest.fail("no free 10.x.y.0/24 for a private test network", pytrace=False)


class Network:
    """``n`` members on a private bridge; see the module docstring."""

    def __init__(self, n: int) -> None:
        tag = secrets.token_hex(3)
        self.hub = f"ec-{tag}-hub"
        self.members = [f"ec-{tag}-{i}" for i in range(n)]
        self.root_link = f"ec{tag}"  # interface names are 15 characters at most
        net = _free_subnet()
        hosts = list(net.hosts())
        self.root_host = str(hosts[0])
        self.hosts = [str(h) for h in hosts[1 : n + 1]]
        self.prefixlen = net.prefixlen
        self._blackholes: set[tuple[int, int]] = set()

    def create(self) -> None:
        ip("netns", "add", self.hub)
        ip("link", "add", "br0", "type", "bridge", netns=self.hub)
        ip("link", "set", "br0", "up", netns=self.hub)
        ip("link", "add", self.root_link, "type", "veth", "peer", "name", "up0", "netns", self.hub)
        self._port("up0")
        ip("addr", "add", f"{self.root_host}/{self.prefixlen}", "dev", self.root_link)
        ip("link", "set", self.root_link, "up")
        for i, (ns, host) in enumerate(zip(self.members, self.hosts, strict=True)):
            ip("netns", "add", ns)
            ip("link", "add", f"m{i}", "netns", self.hub, "type", "veth", "peer", "name", "eth0",
               "netns", ns)  # fmt: skip
            self._port(f"m{i}")
            ip("addr", "add", f"{host}/{self.prefixlen}", "dev", "eth0", netns=ns)
            ip("link", "set", "eth0", "up", netns=ns)
            ip("link", "set", "lo", "up", netns=ns)

    def _port(self, link: str) -> None:
        ip("link", "set", link, "master", "br0", netns=self.hub)
        ip("link", "set", link, "up", netns=self.hub)

    def prefix(self, i: int) -> list[str]:
        """The command prefix that runs a process in member ``i``'s namespace."""
        return ["ip", "netns", "exec", self.members[i]]

    def isolate(self, i: int) -> None:
        """Cut member ``i`` off from every other member, both ways (not from the root)."""
        for j in range(len(self.members)):
            if j != i:
                self._blackhole(i, j, "add")
                self._blackhole(j, i, "add")

    def heal(self) -> None:
        for i, j in list(self._blackholes):
            self._blackhole(i, j, "del")

    def _blackhole(self, i: int, j: int, action: str) -> None:
        ip("route", action, "blackhole", self.hosts[j], netns=self.members[i])
        if action == "add":
            self._blackholes.add((i, j))
        else:
            self._blackholes.discard((i, j))

    def remove(self) -> None:
        """Delete everything made here, whatever state a failed test left it in."""
        for ns in [*self.members, self.hub]:
            ip("netns", "del", ns, check=False)
        ip("link", "del", self.root_link, check=False)  # gone with its peer, normally

    def leftovers(self) -> list[str]:
        names = ip("netns", "list") + ip("-o", "link", "show")
        return [x for x in [*self.members, self.hub, self.root_link] if x in names]

"""ARP for L2 announcements: the packet codec, and a responder that answers who-has requests for the
addresses this node leads, from raw AF_PACKET sockets on the selected interfaces, and sends a
gratuitous ARP when it takes an address over (Cilium answers from its L2 responder program; the
effect on the wire is the same).

The addresses are virtual: they are on no interface, so the kernel never answers for them itself.
Malformed frames are dropped and counted; the responder keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("cilia.announcer.arp")

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST = b"\xff" * 6
SIOCGIFFLAGS = 0x8913
IFF_LOOPBACK = 0x8
IFF_NOARP = 0x80
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")


@dataclass(frozen=True)
class ARP:
    """An ARP packet for IPv4 over Ethernet."""

    op: int
    sha: bytes
    spa: str
    tha: bytes
    tpa: str


def parse(frame: bytes) -> ARP | None:
    """The ARP packet of an Ethernet frame, or None if it is not a well-formed IPv4-over-Ethernet ARP."""
    if len(frame) < _ETH.size + _ARP.size:
        return None
    _dst, _src, ethertype = _ETH.unpack_from(frame)
    if ethertype != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, _ETH.size)
    if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4 or op not in (ARP_REQUEST, ARP_REPLY):
        return None
    return ARP(op, sha, socket.inet_ntoa(spa), tha, socket.inet_ntoa(tpa))


def frame(op: int, src_mac: bytes, spa: str, dst_mac: bytes, tha: bytes, tpa: str) -> bytes:
    """An Ethernet frame carrying one ARP packet (padded to the 60-byte minimum)."""
    body = _ETH.pack(dst_mac, src_mac, ETH_P_ARP) + _ARP.pack(
        1, ETH_P_IP, 6, 4, op, src_mac, socket.inet_aton(spa), tha, socket.inet_aton(tpa)
    )
    return body.ljust(60, b"\x00")


def reply(mac: bytes, address: str, request: ARP) -> bytes:
    """`address is-at mac`, to whoever asked."""
    return frame(ARP_REPLY, mac, address, request.sha, request.sha, request.spa)


def gratuitous(mac: bytes, address: str) -> bytes:
    """A gratuitous ARP reply: `address is-at mac`, broadcast, so neighbours update their caches."""
    return frame(ARP_REPLY, mac, address, BROADCAST, BROADCAST, address)


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def arp_interfaces() -> list[str]:
    """Interfaces of this network namespace that can carry ARP: not loopback, not NOARP (the VXLAN
    device), not an endpoint's veth (`lxc…`: pods are not the LAN)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            if name.startswith("lxc"):
                continue
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16sH14x", name.encode()[:15], 0))
            except OSError:
                continue
            flags = struct.unpack_from("16sH", raw)[1]
            if flags & (IFF_LOOPBACK | IFF_NOARP):
                continue
            out.append(name)
    return out


class _Port:
    """One interface's raw socket."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        try:
            self.sock.bind((name, ETH_P_ARP))
            self.sock.setblocking(False)
            self.mac: bytes = self.sock.getsockname()[4]
        except OSError:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()


class Responder:
    """Answers who-has for `announcements` (interface -> addresses) until closed."""

    def __init__(self) -> None:
        self.ports: dict[str, _Port] = {}
        self.announcements: dict[str, frozenset[str]] = {}
        self.stats = {"requests": 0, "replies": 0, "malformed": 0, "gratuitous": 0}
        self._loop: asyncio.AbstractEventLoop | None = None

    def update(self, announcements: Mapping[str, frozenset[str]]) -> None:
        """Serve exactly these addresses on these interfaces; send gratuitous ARP for new ones."""
        self._loop = self._loop or asyncio.get_running_loop()
        wanted = {i: a for i, a in announcements.items() if a}
        for name in list(self.ports):
            if name not in wanted:
                self._loop.remove_reader(self.ports[name].sock.fileno())
                self.ports.pop(name).close()
        for name, addresses in wanted.items():
            port = self.ports.get(name)
            if port is None:
                try:
                    port = _Port(name)
                except OSError as err:
                    log.warning("event=arp-socket-failed interface=%s error=%r", name, str(err))
                    continue
                self.ports[name] = port
                self._loop.add_reader(port.sock.fileno(), self._readable, port)
            for address in sorted(addresses - self.announcements.get(name, frozenset())):
                self.send_gratuitous(port, address)
        self.announcements = {i: a for i, a in wanted.items() if i in self.ports}

    def send_gratuitous(self, port: _Port, address: str) -> None:
        try:
            port.sock.send(gratuitous(port.mac, address))
            self.stats["gratuitous"] += 1
            log.info("event=garp-sent interface=%s ip=%s mac=%s", port.name, address, mac_text(port.mac))
        except OSError as err:
            log.warning("event=garp-failed interface=%s ip=%s error=%r", port.name, address, str(err))

    def _readable(self, port: _Port) -> None:
        for _ in range(64):  # drain a burst, then let the loop breathe
            try:
                data, addr = port.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.warning("event=arp-recv-failed interface=%s error=%r", port.name, str(err))
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            packet = parse(data)
            if packet is None:
                self.stats["malformed"] += 1
                continue
            if packet.op != ARP_REQUEST:
                continue
            self.stats["requests"] += 1
            if packet.tpa not in self.announcements.get(port.name, frozenset()):
                continue
            with contextlib.suppress(OSError):
                port.sock.send(reply(port.mac, packet.tpa, packet))
                self.stats["replies"] += 1

    def close(self) -> None:
        for port in self.ports.values():
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(port.sock.fileno())
            port.close()
        self.ports.clear()
        self.announcements = {}

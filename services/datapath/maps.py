"""Typed access to the datapath's pinned BPF maps (layouts of bpf/lib/maps.h, mirrored once here).

Maps are opened by their pin path under the node's pin root (`/sys/fs/bpf/cilia/<node>/`) with the
bpf(2) system call, so the agent, the CLI (`cilia bpf ...`) and tests read the same maps whether
or not an agent runs. Nothing here imports bcc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from cilia.policy.mapstate import MapEntry, MapKey
from cilia.policy.rules import EGRESS, INGRESS, Direction

PIN_BASE = Path("/sys/fs/bpf/cilia")

IPCACHE = "ipcache"
ENDPOINTS = "endpoints"
POLICY = "policy"
CT = "ct"
METRICS = "metrics"
PROXY_PORTS = "proxy_ports"
POLICY_REV = "policy_rev"
CONFIG = "config"
LB_SERVICES = "lb_services"
LB_BACKENDS = "lb_backends"
LB_CT = "lb_ct"
LB_AFFINITY = "lb_affinity"
SVC_F_AFFINITY = 0x1
SVC_F_EXTERNAL = 0x2
SVC_F_LOCAL_ONLY = 0x4
CT_NAT_SERVICE = 0x1
CT_NAT_HAIRPIN = 0x2
CONFIG_OVERLAY_IFINDEX = 0
CONFIG_NODE_IP = 1
EVENTS = "events"
MAP_NAMES = (IPCACHE, ENDPOINTS, POLICY, CT, METRICS, PROXY_PORTS, POLICY_REV, EVENTS)
METRICS_SLOTS = 1024  # index = reason * 4 + direction

POLICY_STATIC_PREFIX = 72  # ep_id + sec_label + egress
EP_F_INGRESS_ENFORCED = 0x1
EP_F_EGRESS_ENFORCED = 0x2
CT_F_REPLY_SEEN = 0x1
CT_F_CLOSING = 0x2
CT_F_PROXIED = 0x4
CT_F_VERDICT_CACHED = 0x8

# skb->mark layout shared with bpf/lib/common.h
MARK_MAGIC_MASK = 0x00000F00
MARK_JUDGED = 0x00000A00
MARK_TO_PROXY = 0x00000B00
MARK_FROM_PROXY = 0x00000C00
MARK_PROXY_INGRESS_DONE = 0x00000080


def pin_root(node: str) -> Path:
    return PIN_BASE / node


def from_proxy_mark(identity: int, ingress_done: bool = False) -> int:
    """The SO_MARK a proxy puts on its upstream socket so the destination sees the real source."""
    if not 0 < identity < (1 << 20):
        raise ValueError(f"identity {identity} cannot be carried in a mark")
    return MARK_FROM_PROXY | (identity << 12) | (MARK_PROXY_INGRESS_DONE if ingress_done else 0)


def to_proxy_mark(port: int) -> int:
    return MARK_TO_PROXY | (port << 16)


# --- layouts ------------------------------------------------------------------------------------


def _ip_to_u32(ip: str | ipaddress.IPv4Address) -> int:
    """An IPv4 address as the u32 whose memory holds it in network order."""
    return int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")


def _u32_to_ip(value: int) -> str:
    return str(ipaddress.IPv4Address(value.to_bytes(4, "little")))


def _be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def _from_be16(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "little"), "big")


class IPCacheKeyC(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


class IPCacheValueC(ctypes.Structure):
    _fields_ = [
        ("identity", ctypes.c_uint32),
        ("tunnel_endpoint", ctypes.c_uint32),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class EndpointInfoC(ctypes.Structure):
    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("ep_id", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("host_mac", ctypes.c_uint8 * 6),
    ]


class PolicyKeyC(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("ep_id", ctypes.c_uint32),
        ("sec_label", ctypes.c_uint32),
        ("egress", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("dport", ctypes.c_uint16),
    ]


class PolicyEntryC(ctypes.Structure):
    _fields_ = [
        ("proxy_port", ctypes.c_uint16),
        ("deny", ctypes.c_uint8),
        ("lpm_prefix_length", ctypes.c_uint8),
        ("proxy_priority", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("cookie", ctypes.c_uint32),
    ]


class CTKeyC(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class CTEntryC(ctypes.Structure):
    _fields_ = [
        ("created", ctypes.c_uint64),
        ("last_seen", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("reply_packets", ctypes.c_uint64),
        ("reply_bytes", ctypes.c_uint64),
        ("src_identity", ctypes.c_uint32),
        ("dst_identity", ctypes.c_uint32),
        ("src_ep", ctypes.c_uint32),
        ("dst_ep", ctypes.c_uint32),
        ("cookie", ctypes.c_uint32),
        ("proxy_port", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("tcp_flags_seen", ctypes.c_uint8),
        ("tcp_flags_seen_reply", ctypes.c_uint8),
        ("nat_flags", ctypes.c_uint8),
        ("nat_port", ctypes.c_uint16),
        ("policy_rev", ctypes.c_uint32),
        ("nat_addr", ctypes.c_uint32),
        ("pad3", ctypes.c_uint32),
    ]


class LBKeyC(ctypes.Structure):
    _fields_ = [
        ("address", ctypes.c_uint32),
        ("dport", ctypes.c_uint16),
        ("slot", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class LBServiceC(ctypes.Structure):
    _fields_ = [
        ("backend_id", ctypes.c_uint32),
        ("count", ctypes.c_uint16),
        ("rev_nat_id", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("local_count", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
        ("affinity_timeout", ctypes.c_uint32),
    ]


class LBBackendC(ctypes.Structure):
    _fields_ = [
        ("address", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
    ]


class MetricsValueC(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


# --- the bpf(2) system call ---------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_SYS_BPF = 321  # x86_64
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_ANY = 0


class MapError(OSError):
    """A BPF map operation failed; the message names the map and what to check."""


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = int(_libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def obj_get(path: Path | str) -> int:
    """An fd for a pinned map or program."""
    buf = ctypes.create_string_buffer(str(path).encode())
    attr = _ObjAttr(pathname=ctypes.addressof(buf))
    try:
        return _bpf(BPF_OBJ_GET, attr)
    except OSError as err:
        if err.errno == errno.ENOENT:
            raise MapError(
                err.errno, f"{path} does not exist: is the datapath agent of this node set up?"
            ) from None
        raise MapError(err.errno, f"cannot open {path}: {err.strerror}") from None


def obj_pin(fd: int, path: Path | str) -> None:
    buf = ctypes.create_string_buffer(str(path).encode())
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(buf), bpf_fd=fd))


def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += (int(hi) - int(lo) + 1) if hi else 1
    return total


K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V", bound=ctypes.Structure)


class BPFMap(Generic[K, V]):
    """A pinned BPF map with ctypes keys and values."""

    def __init__(self, path: Path, key_type: type[K], value_type: type[V], per_cpu: bool = False) -> None:
        self.path = path
        self.key_type = key_type
        self.value_type = value_type
        self.per_cpu = per_cpu
        self.fd = obj_get(path)
        self._ncpu = possible_cpus() if per_cpu else 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _value_buffer(self) -> ctypes.Array[ctypes.c_char]:
        size = ctypes.sizeof(self.value_type)
        if self.per_cpu:
            size = ((size + 7) // 8) * 8 * self._ncpu
        return ctypes.create_string_buffer(size)

    def lookup(self, key: K) -> V | None:
        buf = self._value_buffer()
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(key), value=ctypes.addressof(buf))
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, attr)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return None
            raise MapError(err.errno, f"lookup in {self.path}: {err.strerror}") from None
        return self.value_type.from_buffer_copy(buf.raw[: ctypes.sizeof(self.value_type)])

    def lookup_per_cpu(self, key: K) -> list[V]:
        buf = self._value_buffer()
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(key), value=ctypes.addressof(buf))
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, attr)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return []
            raise MapError(err.errno, f"lookup in {self.path}: {err.strerror}") from None
        step = ((ctypes.sizeof(self.value_type) + 7) // 8) * 8
        return [
            self.value_type.from_buffer_copy(buf.raw[i * step : i * step + ctypes.sizeof(self.value_type)])
            for i in range(self._ncpu)
        ]

    def update(self, key: K, value: V) -> None:
        attr = _ElemAttr(
            map_fd=self.fd, key=ctypes.addressof(key), value=ctypes.addressof(value), flags=BPF_ANY
        )
        try:
            _bpf(BPF_MAP_UPDATE_ELEM, attr)
        except OSError as err:
            raise MapError(err.errno, f"update of {self.path}: {err.strerror}") from None

    def delete(self, key: K) -> bool:
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(key))
        try:
            _bpf(BPF_MAP_DELETE_ELEM, attr)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return False
            raise MapError(err.errno, f"delete in {self.path}: {err.strerror}") from None
        return True

    def keys(self) -> Iterator[K]:
        """Every key (a snapshot walk with BPF_MAP_GET_NEXT_KEY)."""
        key_size = ctypes.sizeof(self.key_type)
        cur: ctypes.Array[ctypes.c_char] | None = None
        while True:
            nxt = ctypes.create_string_buffer(key_size)
            attr = _ElemAttr(
                map_fd=self.fd,
                key=ctypes.addressof(cur) if cur is not None else 0,
                value=ctypes.addressof(nxt),
            )
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as err:
                if err.errno == errno.ENOENT:
                    return
                raise MapError(err.errno, f"walk of {self.path}: {err.strerror}") from None
            yield self.key_type.from_buffer_copy(nxt.raw)
            cur = nxt

    def __iter__(self) -> Iterator[K]:
        return self.keys()

    def items(self) -> Iterator[tuple[K, V]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def clear(self) -> int:
        n = 0
        for key in list(self.keys()):
            n += self.delete(key)
        return n


# --- typed views --------------------------------------------------------------------------------


def cookie_of(reason: str) -> int:
    """The 32-bit cookie an entry carries: a stable hash of the rule it came from (0 = none)."""
    return (zlib.crc32(reason.encode()) or 1) if reason else 0


@dataclass(frozen=True)
class PolicyMapEntry:
    ep_id: int
    key: MapKey
    entry: PolicyEntryC


def policy_key_c(ep_id: int, key: MapKey) -> PolicyKeyC:
    port = key.port if key.plen > 8 else 0
    return PolicyKeyC(
        prefixlen=POLICY_STATIC_PREFIX + key.plen,
        ep_id=ep_id,
        sec_label=key.identity,
        egress=1 if key.direction == EGRESS else 0,
        protocol=key.proto,
        dport=_be16(port),
    )


def policy_entry_c(key: MapKey, entry: MapEntry, proxy_ports: dict[str, int]) -> PolicyEntryC:
    port = proxy_ports.get(entry.parser, 0) if entry.parser else 0
    if entry.parser and not port:
        port = 65535  # no proxy registered for this parser: the datapath fails closed
    return PolicyEntryC(
        proxy_port=0 if entry.deny else port,
        deny=1 if entry.deny else 0,
        lpm_prefix_length=key.plen,
        proxy_priority=entry.priority,
        cookie=cookie_of(entry.reason),
    )


def map_key_of(k: PolicyKeyC) -> tuple[int, MapKey]:
    plen = k.prefixlen - POLICY_STATIC_PREFIX
    direction: Direction = EGRESS if k.egress else INGRESS
    return k.ep_id, MapKey(direction, k.sec_label, k.protocol, _from_be16(k.dport), plen)


@dataclass
class DatapathMaps:
    """Every map of one node, opened from its pin root."""

    root: Path
    ipcache: BPFMap[IPCacheKeyC, IPCacheValueC]
    endpoints: BPFMap[ctypes.c_uint32, EndpointInfoC]  # type: ignore[type-var]
    policy: BPFMap[PolicyKeyC, PolicyEntryC]
    ct: BPFMap[CTKeyC, CTEntryC]
    metrics: BPFMap[ctypes.c_uint32, MetricsValueC]  # type: ignore[type-var]
    proxy_ports: BPFMap[ctypes.c_uint16, ctypes.c_uint8]  # type: ignore[type-var]
    policy_rev: BPFMap[ctypes.c_uint32, ctypes.c_uint32]  # type: ignore[type-var]
    config: BPFMap[ctypes.c_uint32, ctypes.c_uint32]  # type: ignore[type-var]
    lb_services: BPFMap[LBKeyC, LBServiceC]
    lb_backends: BPFMap[ctypes.c_uint32, LBBackendC]  # type: ignore[type-var]

    @classmethod
    def open(cls, root: Path) -> DatapathMaps:
        return cls(
            root,
            BPFMap(root / IPCACHE, IPCacheKeyC, IPCacheValueC),
            BPFMap(root / ENDPOINTS, ctypes.c_uint32, EndpointInfoC),  # type: ignore[type-var]
            BPFMap(root / POLICY, PolicyKeyC, PolicyEntryC),
            BPFMap(root / CT, CTKeyC, CTEntryC),
            BPFMap(root / METRICS, ctypes.c_uint32, MetricsValueC, per_cpu=True),  # type: ignore[type-var]
            BPFMap(root / PROXY_PORTS, ctypes.c_uint16, ctypes.c_uint8),  # type: ignore[type-var]
            BPFMap(root / POLICY_REV, ctypes.c_uint32, ctypes.c_uint32),  # type: ignore[type-var]
            BPFMap(root / CONFIG, ctypes.c_uint32, ctypes.c_uint32),  # type: ignore[type-var]
            BPFMap(root / LB_SERVICES, LBKeyC, LBServiceC),
            BPFMap(root / LB_BACKENDS, ctypes.c_uint32, LBBackendC),  # type: ignore[type-var]
        )

    def close(self) -> None:
        for m in (
            self.ipcache,
            self.endpoints,
            self.policy,
            self.ct,
            self.metrics,
            self.proxy_ports,
            self.policy_rev,
            self.config,
            self.lb_services,
            self.lb_backends,
        ):
            m.close()

    # ipcache
    def ipcache_set(self, prefix: str, identity: int, tunnel_endpoint: str | None = None) -> None:
        net = ipaddress.IPv4Network(prefix, strict=False)
        key = IPCacheKeyC(prefixlen=net.prefixlen, addr=_ip_to_u32(net.network_address))
        value = IPCacheValueC(
            identity=identity, tunnel_endpoint=_ip_to_u32(tunnel_endpoint) if tunnel_endpoint else 0
        )
        self.ipcache.update(key, value)

    def ipcache_delete(self, prefix: str) -> bool:
        net = ipaddress.IPv4Network(prefix, strict=False)
        return self.ipcache.delete(IPCacheKeyC(prefixlen=net.prefixlen, addr=_ip_to_u32(net.network_address)))

    def ipcache_items(self) -> list[tuple[str, int, str | None]]:
        out = []
        for k, v in self.ipcache.items():
            prefix = f"{_u32_to_ip(k.addr)}/{k.prefixlen}"
            out.append(
                (prefix, int(v.identity), _u32_to_ip(v.tunnel_endpoint) if v.tunnel_endpoint else None)
            )
        return sorted(out, key=lambda t: (ipaddress.IPv4Network(t[0]).network_address, t[0]))

    # endpoints
    def endpoint_set(
        self, ip: str, ifindex: int, ep_id: int, identity: int, flags: int, host_mac: str
    ) -> None:
        mac = (ctypes.c_uint8 * 6)(*bytes.fromhex(host_mac.replace(":", "")))
        self.endpoints.update(
            ctypes.c_uint32(_ip_to_u32(ip)),
            EndpointInfoC(ifindex=ifindex, ep_id=ep_id, identity=identity, flags=flags, host_mac=mac),
        )

    def endpoint_delete(self, ip: str) -> bool:
        return self.endpoints.delete(ctypes.c_uint32(_ip_to_u32(ip)))

    def endpoint_items(self) -> list[tuple[str, EndpointInfoC]]:
        return sorted((_u32_to_ip(int(k.value)), v) for k, v in self.endpoints.items())

    # policy
    def policy_entries(self, ep_id: int | None = None) -> dict[tuple[int, MapKey], PolicyEntryC]:
        out = {}
        for k, v in self.policy.items():
            eid, mk = map_key_of(k)
            if ep_id is None or eid == ep_id:
                out[(eid, mk)] = v
        return out

    def policy_write(
        self,
        ep_id: int,
        upserts: dict[MapKey, MapEntry],
        deletes: frozenset[MapKey] | set[MapKey],
        proxy_ports: dict[str, int],
    ) -> None:
        """Write one endpoint's map-state diff: new and changed entries first, then deletions."""
        for key, entry in upserts.items():
            self.policy.update(policy_key_c(ep_id, key), policy_entry_c(key, entry, proxy_ports))
        for key in deletes:
            self.policy.delete(policy_key_c(ep_id, key))

    def policy_flush(self, ep_id: int) -> int:
        n = 0
        for k in list(self.policy.keys()):
            if k.ep_id == ep_id:
                n += self.policy.delete(k)
        return n

    # conntrack
    def ct_items(self) -> list[tuple[CTKeyC, CTEntryC]]:
        return list(self.ct.items())

    # metrics
    def metrics_totals(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(reason, direction) -> (packets, bytes), summed over CPUs; reason 0 = forwarded."""
        out: dict[tuple[int, int], tuple[int, int]] = {}
        for idx in range(METRICS_SLOTS):
            values = self.metrics.lookup_per_cpu(ctypes.c_uint32(idx))
            packets = sum(int(v.packets) for v in values)
            if packets:
                out[(idx >> 2, idx & 3)] = (packets, sum(int(v.bytes) for v in values))
        return out

    # policy revision
    def policy_revision(self) -> int:
        value = self.policy_rev.lookup(ctypes.c_uint32(0))
        return int(value.value) if value is not None else 0

    def bump_policy_revision(self) -> int:
        """Invalidate the verdicts cached in conntrack: call after every batch of map writes."""
        new = (self.policy_revision() + 1) & 0xFFFFFFFF
        self.policy_rev.update(ctypes.c_uint32(0), ctypes.c_uint32(new))
        return new

    # service load balancing
    def lb_backend_items(self) -> dict[int, tuple[str, int, int]]:
        """backend id -> (address, port, protocol)."""
        return {
            int(k.value): (_u32_to_ip(v.address), _from_be16(v.port), int(v.proto))
            for k, v in self.lb_backends.items()
        }

    def lb_backend_set(self, backend_id: int, address: str, port: int, proto: int) -> None:
        self.lb_backends.update(
            ctypes.c_uint32(backend_id),
            LBBackendC(address=_ip_to_u32(address), port=_be16(port), proto=proto),
        )

    def lb_backend_delete(self, backend_id: int) -> bool:
        return self.lb_backends.delete(ctypes.c_uint32(backend_id))

    def lb_service_items(self) -> dict[tuple[str, int, int, int], LBServiceC]:
        """(frontend address, port, protocol, slot) -> entry."""
        return {
            (_u32_to_ip(k.address), _from_be16(k.dport), int(k.proto), int(k.slot)): v
            for k, v in self.lb_services.items()
        }

    def lb_service_set(self, address: str, port: int, proto: int, slot: int, value: LBServiceC) -> None:
        key = LBKeyC(address=_ip_to_u32(address), dport=_be16(port), slot=slot, proto=proto)
        self.lb_services.update(key, value)

    def lb_service_delete(self, address: str, port: int, proto: int, slot: int) -> bool:
        return self.lb_services.delete(
            LBKeyC(address=_ip_to_u32(address), dport=_be16(port), slot=slot, proto=proto)
        )

    # node configuration
    def config_set(self, index: int, value: int) -> None:
        self.config.update(ctypes.c_uint32(index), ctypes.c_uint32(value))

    def config_set_ip(self, index: int, ip: str) -> None:
        self.config_set(index, _ip_to_u32(ip))

    def config_get(self, index: int) -> int:
        value = self.config.lookup(ctypes.c_uint32(index))
        return int(value.value) if value is not None else 0

    # proxy ports
    def proxy_port_set(self, port: int) -> None:
        self.proxy_ports.update(ctypes.c_uint16(port), ctypes.c_uint8(1))

    def proxy_port_delete(self, port: int) -> bool:
        return self.proxy_ports.delete(ctypes.c_uint16(port))

    def proxy_port_list(self) -> list[int]:
        return sorted(int(k.value) for k in self.proxy_ports)


def ct_tuple(k: CTKeyC) -> tuple[str, str, int, int, int]:
    return (_u32_to_ip(k.saddr), _u32_to_ip(k.daddr), _from_be16(k.sport), _from_be16(k.dport), int(k.proto))

"""Node IPAM: hands out endpoint IPv4 addresses from the node's pod CIDR, as Cilium's cluster-pool IPAM does on a node.

Pure: no I/O. The agent records allocations with the endpoint and claims them back after a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError

from cilia.errors import CiliaError

MAX_PREFIXLEN = 30  # a /31 or /32 has no room for a router and an endpoint


class IpamError(CiliaError):
    """An address cannot be handed out or taken back; the message says which and why."""


class IpamExhaustedError(IpamError):
    """Every usable address of the pod CIDR is allocated."""


class IpInUseError(IpamError):
    """The address is allocated to another owner."""


class IpUnavailableError(IpamError):
    """The address is outside the pod CIDR, or is its network, broadcast, router or a reserved address."""


def _as_address(ip: IPv4Address | str) -> IPv4Address:
    if isinstance(ip, IPv4Address):
        return ip
    try:
        return IPv4Address(ip)
    except AddressValueError:
        raise IpamError(f"{ip!r} is not an IPv4 address") from None


class Ipam:
    """Allocator over one pod CIDR.

    The network and broadcast addresses, the router address (the first host address, which Cilium gives
    to `cilium_host`) and the `reserved` addresses are never handed out. `allocate` is next-fit: it
    takes the lowest free address after the last one it handed out, wrapping around, so a released
    address is not reused at once (its ipcache and conntrack entries have time to go away), and the
    same sequence of calls always yields the same addresses.
    """

    def __init__(self, cidr: IPv4Network | str, reserved: Iterable[IPv4Address | str] = ()) -> None:
        if isinstance(cidr, str):
            try:
                cidr = IPv4Network(cidr)
            except (AddressValueError, NetmaskValueError, ValueError) as err:
                raise IpamError(f"pod CIDR {cidr!r} is not an IPv4 network: {err}") from None
        if cidr.prefixlen > MAX_PREFIXLEN:
            raise IpamError(f"pod CIDR {cidr} is too small: use a /{MAX_PREFIXLEN} or larger")
        self._cidr = cidr
        self._first = int(cidr.network_address) + 1  # the router
        self._last = int(cidr.broadcast_address) - 1
        self._router = IPv4Address(self._first)
        # Reserved addresses outside the CIDR (the node's own addresses, say) are never handed out anyway.
        self._reserved = frozenset(
            a for a in map(_as_address, reserved) if self._first <= int(a) <= self._last
        ) | {self._router}
        self._owners: dict[IPv4Address, str] = {}
        self._cursor = self._first  # the last address handed out (or the router: start right after it)

    @property
    def cidr(self) -> IPv4Network:
        """The pod CIDR."""
        return self._cidr

    @property
    def router(self) -> IPv4Address:
        """The router address of the CIDR (its first host address), never handed out to an endpoint."""
        return self._router

    @property
    def capacity(self) -> int:
        """How many addresses this allocator can hand out in all."""
        return self._last - self._first + 1 - len(self._reserved)

    @property
    def available(self) -> int:
        """How many addresses are free right now."""
        return self.capacity - len(self._owners)

    def allocations(self) -> Mapping[IPv4Address, str]:
        """A copy of the allocated addresses and their owners, in address order."""
        return dict(sorted(self._owners.items()))

    def owner(self, ip: IPv4Address | str) -> str | None:
        """The owner of `ip`, or None if it is free."""
        return self._owners.get(_as_address(ip))

    def allocate(self, owner: str) -> IPv4Address:
        """Hand out the next free address to `owner` (each call allocates another address)."""
        span = self._last - self._first + 1
        for step in range(1, span + 1):
            candidate = IPv4Address(self._first + (self._cursor - self._first + step) % span)
            if candidate not in self._reserved and candidate not in self._owners:
                self._owners[candidate] = owner
                self._cursor = int(candidate)
                return candidate
        raise IpamExhaustedError(
            f"pod CIDR {self._cidr} is exhausted: all {self.capacity} addresses are allocated;"
            " release some or give the node a larger pod CIDR"
        )

    def claim(self, ip: IPv4Address | str, owner: str) -> IPv4Address:
        """Allocate this very address to `owner` (a requested IP, or a restore after a restart).

        Claiming an address the same owner already holds is a no-op.
        """
        address = _as_address(ip)
        self._check_usable(address)
        current = self._owners.get(address)
        if current is not None and current != owner:
            raise IpInUseError(f"{address} is already allocated to {current}")
        self._owners[address] = owner
        return address

    def release(self, ip: IPv4Address | str) -> str | None:
        """Free `ip` and return its former owner (None if it was not allocated: releasing twice is fine)."""
        return self._owners.pop(_as_address(ip), None)

    def _check_usable(self, address: IPv4Address) -> None:
        if address not in self._cidr:
            raise IpUnavailableError(f"{address} is outside the pod CIDR {self._cidr}")
        if address == self._cidr.network_address:
            raise IpUnavailableError(f"{address} is the network address of {self._cidr}")
        if address == self._cidr.broadcast_address:
            raise IpUnavailableError(f"{address} is the broadcast address of {self._cidr}")
        if address == self._router:
            raise IpUnavailableError(f"{address} is the router address of {self._cidr}")
        if address in self._reserved:
            raise IpUnavailableError(f"{address} is reserved")

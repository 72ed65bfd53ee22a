"""Node IPAM: which addresses an endpoint gets from the pod CIDR, and the errors when it cannot get one."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from cilia.errors import CiliaError
from services.datapath.ipam import (
    Ipam,
    IpamError,
    IpamExhaustedError,
    IpInUseError,
    IpUnavailableError,
)

A = IPv4Address


def test_allocation_starts_after_the_router_and_goes_up_in_order() -> None:
    ipam = Ipam(IPv4Network("10.0.1.0/24"))
    assert ipam.router == A("10.0.1.1")
    assert [ipam.allocate(f"default/pod{i}") for i in range(3)] == [
        A("10.0.1.2"),
        A("10.0.1.3"),
        A("10.0.1.4"),
    ]
    assert ipam.owner("10.0.1.3") == "default/pod1"
    assert ipam.owner(A("10.0.1.9")) is None


def test_same_calls_give_same_addresses() -> None:
    def run() -> list[IPv4Address]:
        ipam = Ipam("10.0.1.0/28", reserved=["10.0.1.3"])
        first = [ipam.allocate("a"), ipam.allocate("b"), ipam.allocate("c")]
        ipam.release(first[1])
        return [*first, ipam.allocate("d"), ipam.allocate("e")]

    assert run() == run()


def test_never_hands_out_network_broadcast_router_or_reserved() -> None:
    cidr = IPv4Network("10.0.1.0/29")  # .0 network, .1 router, .7 broadcast
    ipam = Ipam(cidr, reserved=[A("10.0.1.4"), A("192.168.0.1")])  # one outside the CIDR: ignored
    got = {ipam.allocate(f"p{i}") for i in range(ipam.capacity)}
    assert got == {A("10.0.1.2"), A("10.0.1.3"), A("10.0.1.5"), A("10.0.1.6")}
    assert ipam.capacity == 4
    assert ipam.available == 0


def test_exhaustion_raises_a_typed_error_that_names_the_cidr() -> None:
    ipam = Ipam("10.0.1.0/30")  # one usable address besides the router
    assert ipam.allocate("a") == A("10.0.1.2")
    with pytest.raises(IpamExhaustedError, match=r"pod CIDR 10\.0\.1\.0/30 is exhausted") as info:
        ipam.allocate("b")
    assert isinstance(info.value, CiliaError)


def test_claim_takes_a_given_address_and_allocate_skips_it() -> None:
    ipam = Ipam("10.0.1.0/24")
    assert ipam.claim("10.0.1.2", "default/restored") == A("10.0.1.2")
    assert ipam.allocate("default/new") == A("10.0.1.3")
    assert ipam.allocations() == {A("10.0.1.2"): "default/restored", A("10.0.1.3"): "default/new"}


def test_claim_by_the_same_owner_again_is_a_no_op() -> None:
    ipam = Ipam("10.0.1.0/24")
    ipam.claim("10.0.1.50", "default/a")
    ipam.claim("10.0.1.50", "default/a")
    assert ipam.owner("10.0.1.50") == "default/a"
    assert ipam.available == ipam.capacity - 1


def test_claim_of_an_address_another_owner_holds_fails() -> None:
    ipam = Ipam("10.0.1.0/24")
    ip = ipam.allocate("default/a")
    with pytest.raises(IpInUseError, match=r"10\.0\.1\.2 is already allocated to default/a"):
        ipam.claim(ip, "default/b")
    assert ipam.owner(ip) == "default/a"


@pytest.mark.parametrize(
    ("ip", "message"),
    [
        ("10.0.2.5", r"10\.0\.2\.5 is outside the pod CIDR 10\.0\.1\.0/24"),
        ("10.0.1.0", r"network address"),
        ("10.0.1.255", r"broadcast address"),
        ("10.0.1.1", r"router address"),
        ("10.0.1.10", r"10\.0\.1\.10 is reserved"),
    ],
)
def test_claim_of_an_unusable_address_fails(ip: str, message: str) -> None:
    ipam = Ipam("10.0.1.0/24", reserved=["10.0.1.10"])
    with pytest.raises(IpUnavailableError, match=message):
        ipam.claim(ip, "default/a")
    assert ipam.allocations() == {}


def test_release_frees_the_address_for_reuse_after_the_others() -> None:
    ipam = Ipam("10.0.1.0/29")  # usable: .2 .. .6
    ips = [ipam.allocate(f"p{i}") for i in range(3)]  # .2 .3 .4
    assert ipam.release(ips[0]) == "p0"
    # next-fit: the freed .2 comes back only after the never-used addresses
    assert [ipam.allocate("q"), ipam.allocate("r")] == [A("10.0.1.5"), A("10.0.1.6")]
    assert ipam.allocate("s") == A("10.0.1.2")
    assert ipam.owner("10.0.1.2") == "s"


def test_release_of_a_free_address_is_harmless() -> None:
    ipam = Ipam("10.0.1.0/24")
    assert ipam.release("10.0.1.7") is None
    assert ipam.release(ipam.allocate("a")) == "a"
    assert ipam.release("10.0.1.2") is None


def test_a_released_address_can_be_claimed_by_another_owner() -> None:
    ipam = Ipam("10.0.1.0/24")
    ip = ipam.allocate("default/a")
    ipam.release(ip)
    assert ipam.claim(ip, "default/b") == ip
    assert ipam.owner(ip) == "default/b"


def test_full_wrap_around_finds_the_only_free_address() -> None:
    ipam = Ipam("10.0.1.0/28")  # usable .2 .. .14: 13 addresses
    ips = [ipam.allocate(f"p{i}") for i in range(ipam.capacity)]
    ipam.release(ips[5])
    assert ipam.allocate("late") == ips[5]
    with pytest.raises(IpamExhaustedError):
        ipam.allocate("one-too-many")


@pytest.mark.parametrize(
    ("cidr", "message"),
    [("10.0.1.0/31", r"too small"), ("10.0.1.1/24", r"not an IPv4 network"), ("nonsense", r"not an IPv4")],
)
def test_bad_cidr_is_a_clear_error(cidr: str, message: str) -> None:
    with pytest.raises(IpamError, match=message):
        Ipam(cidr)


def test_bad_address_is_a_clear_error() -> None:
    with pytest.raises(IpamError, match=r"'10\.0\.1' is not an IPv4 address"):
        Ipam("10.0.1.0/24").claim("10.0.1", "a")

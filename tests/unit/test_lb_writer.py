"""The load-balancing map writer (services/datapath/lb.py): a backend that leaves its service while
its pod lives stays in the backend map (terminating: no slot, so no new connection) until no open
connection uses it; a backend whose pod is gone goes at once. The maps are a dict-backed stand-in
(the e2e tests in tests/e2e/test_services.py run the same writer on the real pinned maps)."""

from __future__ import annotations

from typing import Any

from services.datapath import lb


class FakeMaps:
    def __init__(self) -> None:
        self.backends: dict[int, tuple[str, int, int]] = {}
        self.services: dict[tuple[str, int, int, int], Any] = {}

    def lb_backend_items(self) -> dict[int, tuple[str, int, int]]:
        return dict(self.backends)

    def lb_service_items(self) -> dict[tuple[str, int, int, int], Any]:
        return dict(self.services)

    def lb_backend_set(self, bid: int, address: str, port: int, proto: int) -> None:
        self.backends[bid] = (address, port, proto)

    def lb_backend_delete(self, bid: int) -> bool:
        return self.backends.pop(bid, None) is not None

    def lb_service_set(self, address: str, port: int, proto: int, slot: int, value: Any) -> None:
        self.services[(address, port, proto, slot)] = value

    def lb_service_delete(self, address: str, port: int, proto: int, slot: int) -> bool:
        return self.services.pop((address, port, proto, slot), None) is not None


def frontend(*ips: str) -> lb.Frontend:
    backends = tuple(lb.Backend(ip, 80, 6, "n1", f"default/p{ip[-1]}") for ip in ips)
    return lb.Frontend("10.96.0.20", 80, 6, "default/web", "ClusterIP", False, False, None, backends)


def test_a_backend_leaving_its_service_is_kept_without_a_slot_until_its_connections_end() -> None:
    m = FakeMaps()
    w = lb.LBWriter(m, "n1")  # type: ignore[arg-type]
    w.write([frontend("10.0.0.1", "10.0.0.2")], {"10.0.0.1", "10.0.0.2"})
    assert sorted(m.backends.values()) == [("10.0.0.1", 80, 6), ("10.0.0.2", 80, 6)]
    w.write([frontend("10.0.0.1")], {"10.0.0.1", "10.0.0.2"})  # .2 left the selector, its pod lives
    slots = {k[3]: v for k, v in m.services.items()}
    assert set(slots) == {0, 1} and slots[0].count == 1  # no slot: no new connection to .2
    assert ("10.0.0.2", 80, 6) in m.backends.values()  # but its open connections still find it
    assert w.gc({("10.0.0.2", 80, 6)}, now=0.0) == 0  # a connection still uses it
    assert w.gc(set(), now=0.0) == 1  # none does any more: it goes
    assert sorted(m.backends.values()) == [("10.0.0.1", 80, 6)]


def test_a_terminating_backend_goes_after_the_longest_wait_and_comes_back_when_selected_again() -> None:
    m = FakeMaps()
    w = lb.LBWriter(m, "n1")  # type: ignore[arg-type]
    w.write([frontend("10.0.0.1", "10.0.0.2")], {"10.0.0.1", "10.0.0.2"})
    w.write([frontend("10.0.0.1")], {"10.0.0.1", "10.0.0.2"})
    since = w.terminating[("10.0.0.2", 80, 6)]
    assert w.gc({("10.0.0.2", 80, 6)}, now=since + lb.TERMINATING_MAX_SECONDS + 1) == 1
    w.write([frontend("10.0.0.1")], {"10.0.0.1", "10.0.0.2"})
    w.write([frontend("10.0.0.1", "10.0.0.2")], {"10.0.0.1", "10.0.0.2"})  # selected again
    assert not w.terminating and len(m.backends) == 2


def test_a_backend_whose_pod_is_gone_goes_at_once() -> None:
    m = FakeMaps()
    w = lb.LBWriter(m, "n1")  # type: ignore[arg-type]
    w.write([frontend("10.0.0.1", "10.0.0.2")], {"10.0.0.1", "10.0.0.2"})
    w.write([frontend("10.0.0.1")], {"10.0.0.1"})  # the pod at .2 was deleted
    assert sorted(m.backends.values()) == [("10.0.0.1", 80, 6)] and not w.terminating

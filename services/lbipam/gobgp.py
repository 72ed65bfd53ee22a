"""One virtual router = one gobgpd (what Cilium embeds), driven over its gRPC API: the process, its
global settings, peers, advertised paths and the export policy that puts each neighbor's path
attributes (communities, local preference) on the routes it is sent.

gobgpd runs in the announcer's network namespace with its API on 127.0.0.1 and, like Cilium's
speaker, no listening socket (`listen_port -1`): it dials its peers. The Python client is generated
at bootstrap from Debian's .proto files (`scripts/gen_gobgp_api.py`, package `gobgpapi`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
from typing import Any

from services.lbipam.selection import Neighbor, PathAttributes, Router

log = logging.getLogger("cilia.announcer.bgp")

EXPORT_POLICY = "cilia-export"


def _api() -> tuple[Any, Any, Any]:
    try:
        from gobgpapi import attribute_pb2, gobgp_pb2, gobgp_pb2_grpc  # type: ignore[import-untyped]
    except ImportError:
        raise RuntimeError(
            "gobgpd's API client is missing: run `make bootstrap` (scripts/gen_gobgp_api.py generates it)"
        ) from None
    return gobgp_pb2, attribute_pb2, gobgp_pb2_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GoBGP:
    """A gobgpd process for one local ASN, and the state it was last told (applied incrementally)."""

    def __init__(self, asn: int, router_id: str, binary: str = "gobgpd") -> None:
        self.asn = asn
        self.router_id = router_id
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Any = None
        self.stub: Any = None
        self.neighbors: dict[str, Neighbor] = {}
        self.routes: dict[str, dict[str, PathAttributes]] = {}
        self._policy_key: object = None

    async def start(self) -> None:
        import grpc  # type: ignore[import-untyped]

        pb, _, pb_grpc = _api()
        self.port = _free_port()
        argv = [self.binary, f"--api-hosts=127.0.0.1:{self.port}", "--pprof-disable", "-p", "-l", "info"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.GobgpApiStub(self.channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gobgpd exited with {self.proc.returncode} at start")
            try:
                await self.stub.GetBgp(pb.GetBgpRequest(), timeout=0.5)
                break
            except grpc.aio.AioRpcError:
                if loop.time() > deadline:
                    raise RuntimeError("gobgpd's API did not answer within 10 s") from None
                await asyncio.sleep(0.05)
        await self.stub.StartBgp(
            pb.StartBgpRequest(
                **{"global": pb.Global(asn=self.asn, router_id=self.router_id, listen_port=-1)}
            )
        )
        log.info(
            "event=bgp-router-started asn=%d router_id=%s api_port=%d", self.asn, self.router_id, self.port
        )

    async def stop(self) -> None:
        """Stop the router: peers get a CEASE notification, then the process ends."""
        pb, _, _ = _api()
        if self.stub is not None:
            with contextlib.suppress(Exception):
                await self.stub.StopBgp(pb.StopBgpRequest(), timeout=2)
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait)
        log.info("event=bgp-router-stopped asn=%d", self.asn)

    # --- peers ------------------------------------------------------------------------------------

    def _peer(self, n: Neighbor) -> Any:
        pb, _, _ = _api()
        families = []
        for afi, _safi in n.families:  # unicast only (the models refuse others)
            fam = pb.Family(
                afi=pb.Family.AFI_IP if afi == "ipv4" else pb.Family.AFI_IP6, safi=pb.Family.SAFI_UNICAST
            )
            families.append(pb.AfiSafi(config=pb.AfiSafiConfig(family=fam, enabled=True)))
        ebgp = n.asn != self.asn
        return pb.Peer(
            conf=pb.PeerConf(neighbor_address=n.address, peer_asn=n.asn),
            transport=pb.Transport(remote_port=n.port),
            timers=pb.Timers(
                config=pb.TimersConfig(
                    connect_retry=n.connect_retry, hold_time=n.hold_time, keepalive_interval=n.keepalive
                )
            ),
            ebgp_multihop=pb.EbgpMultihop(enabled=ebgp and n.multihop_ttl > 1, multihop_ttl=n.multihop_ttl),
            graceful_restart=pb.GracefulRestart(enabled=n.graceful_restart, restart_time=n.restart_time),
            afi_safis=families,
        )

    async def _sync_peers(self, wanted: dict[str, Neighbor]) -> None:
        pb, _, _ = _api()
        for address, old in list(self.neighbors.items()):
            if wanted.get(address) != old:
                await self.stub.DeletePeer(pb.DeletePeerRequest(address=address))
                del self.neighbors[address]
                log.info("event=bgp-peer-removed asn=%d peer=%s", self.asn, address)
        for address, n in wanted.items():
            if address not in self.neighbors:
                await self.stub.AddPeer(pb.AddPeerRequest(peer=self._peer(n)))
                self.neighbors[address] = n
                log.info("event=bgp-peer-added asn=%d peer=%s peer_asn=%d", self.asn, address, n.asn)

    # --- paths ------------------------------------------------------------------------------------

    def _path(self, prefix: str) -> Any:
        pb, attr, _ = _api()
        from google.protobuf.any_pb2 import Any as PbAny  # type: ignore[import-untyped]

        net = ipaddress.ip_network(prefix)
        nlri = PbAny()
        nlri.Pack(attr.IPAddressPrefix(prefix_len=net.prefixlen, prefix=str(net.network_address)))
        origin, nexthop = PbAny(), PbAny()
        origin.Pack(attr.OriginAttribute(origin=0))  # IGP
        v6 = net.version == 6
        nexthop.Pack(attr.NextHopAttribute(next_hop="::" if v6 else self.router_id))
        fam = pb.Family(afi=pb.Family.AFI_IP6 if v6 else pb.Family.AFI_IP, safi=pb.Family.SAFI_UNICAST)
        pattrs = [origin]
        if v6:
            mp = PbAny()
            mp.Pack(attr.MpReachNLRIAttribute(family=fam, next_hops=["::"], nlris=[nlri]))
            pattrs.append(mp)
        else:
            pattrs.append(nexthop)
        return pb.Path(nlri=nlri, pattrs=pattrs, family=fam)

    async def _sync_routes(self, wanted: dict[str, dict[str, PathAttributes]]) -> None:
        pb, _, _ = _api()
        for prefix in [p for p in self.routes if p not in wanted]:
            await self.stub.DeletePath(pb.DeletePathRequest(table_type=pb.GLOBAL, path=self._path(prefix)))
            del self.routes[prefix]
            log.info("event=bgp-route-withdrawn asn=%d prefix=%s", self.asn, prefix)
        for prefix, attrs in wanted.items():
            if prefix not in self.routes:
                await self.stub.AddPath(pb.AddPathRequest(table_type=pb.GLOBAL, path=self._path(prefix)))
                log.info("event=bgp-route-advertised asn=%d prefix=%s", self.asn, prefix)
            self.routes[prefix] = attrs

    async def _sync_policy(self) -> bool:
        """Per-neighbor attributes as one export policy: a statement per (neighbor, route) that
        matches both and adds the attributes. Returns whether it changed."""
        pb, _, _ = _api()
        key = tuple(sorted((p, tuple(sorted(a.items()))) for p, a in self.routes.items()))
        if key == self._policy_key:
            return False
        sets: list[Any] = []
        statements: list[Any] = []
        neighbor_sets: set[str] = set()
        for i, (prefix, per_neighbor) in enumerate(sorted(self.routes.items())):
            net = ipaddress.ip_network(prefix)
            for address, attrs in sorted(per_neighbor.items()):
                if not attrs or address not in self.neighbors:
                    continue
                pname, nname = f"route-{i}", f"peer-{address}"
                if not any(s.name == pname for s in sets):
                    sets.append(
                        pb.DefinedSet(
                            defined_type=pb.PREFIX,
                            name=pname,
                            prefixes=[
                                pb.Prefix(
                                    ip_prefix=prefix,
                                    mask_length_min=net.prefixlen,
                                    mask_length_max=net.prefixlen,
                                )
                            ],
                        )
                    )
                if nname not in neighbor_sets:
                    neighbor_sets.add(nname)
                    host = ipaddress.ip_address(address)
                    sets.append(
                        pb.DefinedSet(
                            defined_type=pb.NEIGHBOR, name=nname, list=[f"{host}/{host.max_prefixlen}"]
                        )
                    )
                actions = pb.Actions(route_action=pb.ACCEPT)
                if attrs.communities:
                    actions.community.CopyFrom(
                        pb.CommunityAction(type=pb.CommunityAction.ADD, communities=list(attrs.communities))
                    )
                if attrs.large:
                    actions.large_community.CopyFrom(
                        pb.CommunityAction(type=pb.CommunityAction.ADD, communities=list(attrs.large))
                    )
                if attrs.local_preference is not None:
                    actions.local_pref.CopyFrom(pb.LocalPrefAction(value=attrs.local_preference))
                statements.append(
                    pb.Statement(
                        name=f"{pname}-{nname}",
                        conditions=pb.Conditions(
                            prefix_set=pb.MatchSet(type=pb.MatchSet.ANY, name=pname),
                            neighbor_set=pb.MatchSet(type=pb.MatchSet.ANY, name=nname),
                        ),
                        actions=actions,
                    )
                )
        policies = [pb.Policy(name=EXPORT_POLICY, statements=statements)] if statements else []
        assignment = pb.PolicyAssignment(
            name="global",
            direction=pb.EXPORT,
            policies=[pb.Policy(name=EXPORT_POLICY)] if statements else [],
            default_action=pb.ACCEPT,
        )
        # SetPolicies replaces the sets and policies; the global assignment is set on its own
        # (gobgpd 3.10 ignores the assignments of SetPolicies for the global RIB).
        empty = pb.PolicyAssignment(name="global", direction=pb.EXPORT, default_action=pb.ACCEPT)
        await self.stub.SetPolicyAssignment(pb.SetPolicyAssignmentRequest(assignment=empty))
        await self.stub.SetPolicies(pb.SetPoliciesRequest(defined_sets=sets, policies=policies))
        if statements:
            await self.stub.SetPolicyAssignment(pb.SetPolicyAssignmentRequest(assignment=assignment))
        self._policy_key = key
        return True

    async def apply(self, router: Router) -> None:
        """Make the router match `router`: peers, routes, then attributes (re-sent to established peers)."""
        pb, _, _ = _api()
        await self._sync_peers(router.neighbors)
        await self._sync_routes(router.routes)
        if await self._sync_policy():
            for address in self.neighbors:
                with contextlib.suppress(Exception):
                    await self.stub.ResetPeer(
                        pb.ResetPeerRequest(address=address, soft=True, direction=pb.ResetPeerRequest.OUT)
                    )

    async def peers(self) -> list[dict[str, Any]]:
        """Each session as `cilium bgp peers` shows it: peer, ASNs, state, uptime, routes sent."""
        pb, _, _ = _api()
        out = []
        stream = self.stub.ListPeer(pb.ListPeerRequest(enableAdvertised=True))
        async for reply in stream:
            p = reply.peer
            state = pb.PeerState.SessionState.Name(p.state.session_state).lower()
            advertised = sum(a.state.advertised for a in p.afi_safis)
            out.append(
                {
                    "local_asn": self.asn,
                    "peer_address": p.conf.neighbor_address,
                    "peer_asn": p.conf.peer_asn,
                    "session_state": state,
                    "advertised": advertised,
                }
            )
        return out

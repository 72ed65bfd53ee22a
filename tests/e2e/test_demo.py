"""`make demo` itself: the live stories on a two-node cluster, on real packets, and nothing left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import VENV_BIN

from services.datapath import maps


def test_the_demo_tells_its_stories_on_two_nodes_and_cleans_up() -> None:
    dirs_before = set(Path("/tmp").glob("cilia-demo-*"))
    out = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "cilia.demo"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    before, _, after = text.partition("==> rule1")
    no_policy = before.split("==> no policy")[1]
    assert no_policy.count("Ship landed") == 2  # both ships land without a policy
    live, _, offline = after.partition("==> offline")
    starwars, _, bookinfo = live.partition("==> BookInfo")
    starwars, _, l7 = starwars.partition("==> L7")
    starwars, _, services = starwars.partition("==> Services")
    # Services: the deathstar behind a ClusterIP (both backends in `cilia service list`, the
    # tiefighter's connections answered by deathstars, the xwing still dropped by rule1) and a
    # LoadBalancer IP from the pool, answered by ARP by a node and reached from outside.
    listing = services.split("$ cilia service list")[1]
    assert "ClusterIP" in listing and "LoadBalancer" in listing and listing.count("(active)") == 4
    spread = services.split("==> tiefighter through the ClusterIP")[1].split("==> xwing")[0]
    answers = [line for line in spread.splitlines()[2:] if line.strip()]
    assert len(answers) == 6 and all(a in ("deathstar-1 /v1/", "deathstar-2 /v1/") for a in answers)
    xwing = services.split("==> xwing through the ClusterIP")[1].split("==> from outside")[0]
    assert "(no answer: curl exit code 28, timed out)" in xwing
    arp = services.split("==> from outside")[1]
    assert "bytes from" in arp and "is the eth0 of demo-node" in arp
    world = services.split("==> the world may land too")[1]
    assert world.rstrip().splitlines()[-1] in ("deathstar-1 /v1/", "deathstar-2 /v1/")
    assert "reached api.github.com /" in after  # the mediabot story (tests/e2e/test_dnsproxy_demo.py)
    # The L7 step: the landing request lands, the exhaust port is denied by the proxy, the xwing
    # never reaches it; and the HTTP flows read like the guide's `hubble observe --protocol http`.
    assert l7.count("Ship landed") == 1 and l7.count("Access denied") == 1
    assert l7.count("(no answer: curl exit code 28, timed out)") == 1
    url = "http://deathstar.default.svc.cluster.local"
    assert f"http-request FORWARDED (HTTP/1.1 POST {url}/v1/request-landing)" in l7
    assert f"http-request DROPPED (HTTP/1.1 PUT {url}/v1/exhaust-port)" in l7
    assert f"http-response FORWARDED (HTTP/1.1 403 0ms (PUT {url}/v1/exhaust-port))" in l7
    assert starwars.count("Ship landed") == 2  # tiefighter, on both deathstars
    assert "(no answer: curl exit code 28, timed out)" in starwars  # the xwing
    assert "policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)" in starwars
    assert "<> default/deathstar-1:80" in starwars and "Policy denied DROPPED (TCP Flags: SYN)" in starwars
    # BookInfo: locked down, then reviews and details answer from both nodes, ratings does not.
    bookinfo = bookinfo.partition("==> mediabot")[0]
    step1, _, step3 = bookinfo.partition("==> step 3")
    assert "(no answer: curl exit code 28, timed out)" in step1
    for answer in ("reviews-v1 /", "reviews-v2 /", "details-v1 /"):
        assert answer in step3
    assert step3.count("(no answer") == 1  # ratings
    assert (
        "[demo-node1]: default/productpage-v1" in step3 and "to-overlay FORWARDED (TCP Flags: SYN)" in step3
    )
    assert (
        "[demo-node2]: default/productpage-v1" in step3 and "from-overlay FORWARDED (TCP Flags: SYN)" in step3
    )
    assert "policy-verdict:none EGRESS DENIED" in step3
    assert "11/11 probes as expected" in offline and "16/16 probes as expected" in offline
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "demo-node" not in netns and "demo-out" not in netns
    assert "demo-br" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert not maps.pin_root("demo-node1").exists() and not maps.pin_root("demo-node2").exists()
    assert set(Path("/tmp").glob("cilia-demo-*")) <= dirs_before  # its state directory is gone

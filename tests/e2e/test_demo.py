"""`make demo` itself: the live Star Wars story on real packets, and nothing left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import VENV_BIN

from services.datapath import maps


def test_the_demo_tells_the_starwars_story_and_cleans_up() -> None:
    out = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "cilia.demo"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    before, _, after = text.partition("==> rule1")
    no_policy = before.split("==> no policy")[1]
    assert no_policy.count("Ship landed") == 2  # both ships land without a policy
    live, _, offline = after.partition("==> offline")
    assert live.count("Ship landed") == 2  # tiefighter, on both deathstars
    assert "(no answer: curl exit code 28, timed out)" in live  # the xwing
    assert "policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)" in live
    assert "<> default/deathstar-1:80" in live and "Policy denied DROPPED (TCP Flags: SYN)" in live
    assert "11/11 probes as expected" in offline and "16/16 probes as expected" in offline
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cilia-demo-node" not in netns
    assert not maps.pin_root("demo").exists()
    assert not any(Path("/tmp").glob("cilia-demo-*/nats.conf"))

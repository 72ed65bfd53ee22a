"""`make demo`'s mediabot story (cilia/demo.py), on its own: the DNS proxy, toFQDNs and the DNS flows."""

from __future__ import annotations

import os
import subprocess

import pytest

import cilia.demo
from cilia.demo import demo, mediabot, mediabot_inet


def test_the_demo_tells_the_mediabot_story_and_cleans_up(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cluster name of its own: `make demo` (cluster `demo`) may be running beside this test.
    monkeypatch.setattr(cilia.demo, "CLUSTER", f"dns{os.getpid() % 100000}")
    with demo() as d:
        d.start()
        mediabot(d)
        nodes = [n.netns for n in d.state.nodes.values()] if d.state else []
    out = capsys.readouterr().out
    assert "reached api.github.com /" in out
    assert "(no answer: curl exit code 28: support.github.com is not selected by toFQDNs)" in out
    assert "dns-request proxy FORWARDED (DNS Query api.github.com. A)" in out
    assert (
        'dns-response proxy FORWARDED (DNS Answer "198.51.100.10" TTL: 30 (Proxy api.github.com. A))' in out
    )
    cache = out.split("$ cilia fqdn cache list")[1].splitlines()
    assert cache[1].split()[0] == "Endpoint"
    assert any("api.github.com." in line and "matchName: api.github.com" in line for line in cache)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert nodes and mediabot_inet() not in netns and not any(n in netns for n in nodes)

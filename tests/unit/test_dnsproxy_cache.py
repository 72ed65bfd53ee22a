"""The FQDN cache: TTLs (with a minimum), the cap on IPs per name, zombies, and saving it."""

from __future__ import annotations

import json

from services.dnsproxy.cache import FQDNCache, rfc3339_milli

T0 = 1_700_000_000.0


def test_an_ip_lives_as_long_as_some_endpoints_lookup_holds_it() -> None:
    c = FQDNCache()
    assert c.update(1, "default/a", "api.github.com.", ["198.51.100.10"], 30, T0) == [
        ("198.51.100.10", "api.github.com.")
    ]
    c.update(2, "default/b", "api.github.com.", ["198.51.100.10"], 60, T0)
    assert c.collect(T0 + 31) == []  # b's lookup still holds it
    assert c.live() == {"198.51.100.10": {"api.github.com."}}
    assert c.collect(T0 + 61) == [("198.51.100.10", "api.github.com.")]
    assert ("198.51.100.10", "api.github.com.") in c.zombies  # until the proxy checks connections
    c.forget([("198.51.100.10", "api.github.com.")])
    assert c.live() == {} and c.endpoints == {}


def test_a_changed_answer_adds_the_new_ip_and_the_old_one_expires_with_its_own_ttl() -> None:
    c = FQDNCache()
    c.update(1, "default/a", "x.test.", ["198.51.100.20"], 10, T0)
    c.update(1, "default/a", "x.test.", ["198.51.100.21"], 10, T0 + 5)
    assert c.live() == {"198.51.100.20": {"x.test."}, "198.51.100.21": {"x.test."}}
    assert c.collect(T0 + 11) == [("198.51.100.20", "x.test.")]
    assert set(c.live()) == {"198.51.100.20", "198.51.100.21"}  # .20 is a zombie until checked
    c.forget([("198.51.100.20", "x.test.")])
    assert set(c.live()) == {"198.51.100.21"}


def test_the_minimum_ttl_stretches_short_ttls() -> None:
    c = FQDNCache(min_ttl=3600)
    c.update(1, "default/a", "x.test.", ["198.51.100.20"], 5, T0)
    assert c.collect(T0 + 60) == []
    assert c.rows(T0)[0].ttl == 3600


def test_the_cap_on_ips_per_name_evicts_the_oldest_first() -> None:
    c = FQDNCache(max_ips_per_host=2)
    c.update(1, "default/a", "cdn.test.", ["198.51.100.1"], 30, T0)
    c.update(1, "default/a", "cdn.test.", ["198.51.100.2"], 30, T0 + 1)
    c.update(1, "default/a", "cdn.test.", ["198.51.100.3"], 30, T0 + 2)
    assert c.collect(T0 + 2) == [("198.51.100.1", "cdn.test.")]
    assert {ip for ip, _ in c._holders} == {"198.51.100.2", "198.51.100.3"}


def test_a_new_lookup_revives_a_zombie() -> None:
    c = FQDNCache()
    c.update(1, "default/a", "x.test.", ["198.51.100.20"], 1, T0)
    c.collect(T0 + 2)
    assert c.zombies
    c.update(1, "default/a", "x.test.", ["198.51.100.20"], 30, T0 + 3)
    assert not c.zombies


def test_rows_group_an_answers_ips_and_show_zombies_as_connections() -> None:
    c = FQDNCache()
    c.update(7, "default/mediabot", "api.github.com.", ["198.51.100.11", "198.51.100.10"], 30, T0)
    c.update(7, "default/mediabot", "old.test.", ["198.51.100.9"], 1, T0)
    c.collect(T0 + 2)
    rows = [r.to_dict() for r in c.rows(T0 + 2)]
    assert rows == [
        {
            "endpoint": 7,
            "endpointName": "default/mediabot",
            "source": "lookup",
            "fqdn": "api.github.com.",
            "ttl": 30,
            "expirationTime": rfc3339_milli(T0 + 30),
            "ips": ["198.51.100.10", "198.51.100.11"],
        },
        {
            "endpoint": 7,
            "endpointName": "default/mediabot",
            "source": "connection",
            "fqdn": "old.test.",
            "ttl": 0,
            "expirationTime": None,
            "ips": ["198.51.100.9"],
        },
    ]
    assert rfc3339_milli(T0 + 30.5) == "2023-11-14T22:13:50.500Z"


def test_the_cache_survives_a_save_and_a_load() -> None:
    c = FQDNCache()
    c.update(1, "default/a", "api.github.com.", ["198.51.100.10"], 30, T0)
    c.update(2, "default/b", "old.test.", ["198.51.100.9"], 1, T0)
    c.collect(T0 + 2)
    again = FQDNCache()
    again.load_json(json.loads(json.dumps(c.to_json())))
    assert again.live() == c.live()
    assert [r.to_dict() for r in again.rows(T0 + 2)] == [r.to_dict() for r in c.rows(T0 + 2)]
    assert again.collect(T0 + 31) == [("198.51.100.10", "api.github.com.")]


def test_the_cli_table_reads_like_cilium_dbgs() -> None:
    from cilia.cli.fqdn import cache_table

    c = FQDNCache()
    c.update(7, "default/mediabot", "api.github.com.", ["198.51.100.10"], 30, T0)
    c.update(7, "default/mediabot", "old.test.", ["198.51.100.9"], 1, T0)
    c.collect(T0 + 2)
    items = [
        r.to_dict(["matchName: api.github.com"] if r.name == "api.github.com." else []) for r in c.rows(T0)
    ]
    assert cache_table(items).splitlines() == [
        "Endpoint   Pod                Source       FQDN              TTL   ExpirationTime             IPs             Selectors",
        "7          default/mediabot   lookup       api.github.com.   30    2023-11-14T22:13:50.000Z   198.51.100.10   matchName: api.github.com",
        "7          default/mediabot   connection   old.test.         0     0001-01-01T00:00:00.000Z   198.51.100.9",
    ]

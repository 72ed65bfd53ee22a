"""The kvstore's pure parts without a server: key shapes, the NATS key mapping, resync, addresses."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cilia.kvstore import Entry, EventKind, InvalidKeyError, KVError, WatchEvent, parse_address
from cilia.kvstore.keys import (
    decode_segment,
    encode_segment,
    nats_filter,
    nats_key,
    path_of_nats_key,
    split_key,
    split_prefix,
)
from cilia.kvstore.resync import resync

segments = st.text(min_size=1, max_size=12).filter(lambda s: "/" not in s)
paths = st.lists(segments, min_size=1, max_size=4).map("/".join)


@given(segments)
def test_a_segment_survives_the_nats_encoding_in_allowed_characters(segment: str) -> None:
    token = encode_segment(segment)
    assert re.fullmatch(r"[-_=a-zA-Z0-9]+", token)
    assert decode_segment(token) == segment


@given(paths, paths)
def test_the_nats_filter_of_a_prefix_matches_every_key_under_it(path: str, other: str) -> None:
    for rest in (path[:cut] for cut in range(len(path) + 1)):
        tokens, pattern = nats_key(path).split("."), nats_filter(rest).split(".")
        assert pattern[-1] == ">" and tokens[: len(pattern) - 1] == pattern[:-1]
    assert path_of_nats_key(nats_key(path)) == path
    assert (nats_key(path) == nats_key(other)) == (path == other)


@pytest.mark.parametrize("token", ["", "=4", "=41", "=2e", "a=", "a.b", "a*"])
def test_a_token_the_mapping_did_not_write_is_refused(token: str) -> None:
    with pytest.raises(ValueError):
        decode_segment(token)


def test_keys_and_prefixes_split_into_bucket_and_path() -> None:
    assert split_key("identities/labels/ab12") == ("identities", "labels/ab12")
    assert split_key("ipcache/10.0.0.0/8") == ("ipcache", "10.0.0.0/8")
    assert split_prefix("identities") == ("identities", "")
    assert split_prefix("identities/lab") == ("identities", "lab")
    assert nats_key("10.0.1.10/k8s:app=web") == "10=2E0=2E1=2E10.k8s=3Aapp=3Dweb"
    for bad in ("identities", "identities/", "a//b", "/a", "a.b/c", "a/b/"):
        with pytest.raises(InvalidKeyError):
            split_key(bad)


def test_resync_puts_new_and_changed_keys_and_deletes_vanished_ones() -> None:
    known = {"b/same": 3, "b/changed": 4, "b/gone": 5}
    current = {
        "b/same": Entry("b/same", b"s", 3),
        "b/changed": Entry("b/changed", b"c", 9),
        "b/new": Entry("b/new", b"n", 8),
    }
    assert resync(known, current, 10) == [
        WatchEvent(EventKind.PUT, "b/new", b"n", 8),
        WatchEvent(EventKind.PUT, "b/changed", b"c", 9),
        WatchEvent(EventKind.DELETE, "b/gone", b"", 10),
    ]


def test_the_kvstore_setting_names_a_backend_and_where_it_is() -> None:
    nats = parse_address("nats", "nats://user:pw@nats.example:4333")
    assert (nats.backend, nats.url, nats.shown) == (
        "nats",
        "nats://user:pw@nats.example:4333",
        "nats://nats.example:4333",
    )
    assert parse_address("etcd://etcd.example").port == 2379
    assert parse_address("nats://10.0.0.1").port == 4222
    for bad in ("redis://x:1", "etcd://u:p@x:2379", "etcd://"):
        with pytest.raises(KVError):
            parse_address(bad)

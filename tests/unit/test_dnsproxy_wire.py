"""The DNS proxy's wire reader: strict on queries, Cilium's ExtractMsgDetails on answers, never a crash."""

from __future__ import annotations

import struct

import pytest
from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, A, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from services.dnsproxy import wire


def query(name: str = "api.github.com", qtype: str = "A") -> bytes:
    return bytes(DNSRecord.question(name, qtype).pack())


def answer(name: str, *records: RR, rcode: int = 0) -> tuple[bytes, wire.Message]:
    q = DNSRecord.question(name, "A")
    r = q.reply()
    r.header.rcode = rcode
    for rr in records:
        r.add_answer(rr)
    data = bytes(r.pack())
    return data, wire.parse_message(data)


HDR = struct.Struct("!HHHHHH")


def test_a_query_is_read_lower_cased_and_fully_qualified() -> None:
    data = query("API.GitHub.com", "AAAA")
    q = wire.parse_query(data)
    assert q.name == "api.github.com."
    assert q.question.type_name == "AAAA"
    assert q.raw == data and q.id == DNSRecord.parse(data).header.id


def test_a_dot_inside_a_label_is_escaped_and_never_passes_for_two_labels() -> None:
    data = HDR.pack(1, 0x0100, 1, 0, 0, 0) + b"\x0aapi.github\x03com\x00\x00\x01\x00\x01"
    assert wire.parse_query(data).name == "api\\.github.com."
    odd = HDR.pack(1, 0x0100, 1, 0, 0, 0) + b"\x03a\x00\xff\x00\x00\x01\x00\x01"
    assert wire.parse_query(odd).name == "a\\000\\255."


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x01\x01", "truncated"),
        (HDR.pack(1, 0x0100, 1, 0, 0, 0) + b"\x03api", "truncated"),
        (HDR.pack(1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01", "compression"),  # points at itself
        (HDR.pack(1, 0x0100, 1, 0, 0, 0) + b"\x01a\xc0\x0e\x00\x01\x00\x01", "compression"),  # a loop
        (HDR.pack(1, 0x0100, 1, 0, 0, 0) + b"\xc0\x20" + b"\x00" * 40, "compression"),  # forwards
        (HDR.pack(1, 0x0100, 2, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01" * 2, "counts"),
        (HDR.pack(1, 0x0100, 0, 0, 0, 0), "counts"),
        (HDR.pack(1, 0x0100, 1, 3, 0, 0) + b"\x01a\x00\x00\x01\x00\x01", "truncated"),  # claims 3 answers
        (HDR.pack(1, 0x0100, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01junk", "counts"),  # trailing bytes
        (HDR.pack(1, 0x0100, 1, 0, 0, 0) + b"\x41" + b"a" * 65 + b"\x00\x00\x01\x00\x01", "label"),
        (
            HDR.pack(1, 0x0100, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01",
            "name-too-long",
        ),
        (HDR.pack(1, 0x8100, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01", "not-a-query"),
        (HDR.pack(1, 0x2800, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01", "not-a-query"),  # UPDATE
        (query() + b"\x00" * 5000, "oversized"),
    ],
)
def test_malformed_queries_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(wire.Malformed) as err:
        wire.parse_query(data)
    assert err.value.reason == reason


def test_edns_queries_are_accepted() -> None:
    q = DNSRecord.question("example.test", "A")
    q.add_ar(EDNS0(udp_len=1232))
    assert wire.parse_query(bytes(q.pack())).name == "example.test."


def test_answers_collapse_cname_chains_keeping_the_lowest_ttl() -> None:
    data, msg = answer(
        "www.github.com",
        RR("www.github.com", QTYPE.CNAME, ttl=300, rdata=CNAME("api.github.com")),
        RR("api.github.com", QTYPE.A, ttl=30, rdata=A("198.51.100.10")),
        RR("api.github.com", QTYPE.A, ttl=60, rdata=A("198.51.100.11")),
    )
    d = wire.answer_details(data, msg)
    assert d.qname == "www.github.com."
    assert d.ips == ("198.51.100.10", "198.51.100.11")
    assert d.ttl == 30
    assert d.cnames == ("api.github.com.",)
    assert d.rrtypes == ("CNAME", "A", "A")
    assert not d.error


def test_an_answer_for_a_name_outside_the_chain_teaches_nothing() -> None:
    data, msg = answer(
        "api.github.com",
        RR("api.github.com", QTYPE.A, ttl=30, rdata=A("198.51.100.10")),
        RR("evil.test", QTYPE.A, ttl=30, rdata=A("198.51.100.66")),
    )
    d = wire.answer_details(data, msg)
    assert d.ips == () and "unexpected name evil.test." in d.error


def test_empty_and_nxdomain_answers_have_the_maximum_ttl_as_hubble_prints() -> None:
    data, msg = answer("nothing.test", rcode=RCODE.NXDOMAIN)
    d = wire.answer_details(data, msg)
    assert (d.ips, d.ttl, d.rcode) == ((), wire.MAX_TTL, 3)


def test_aaaa_answers_are_read() -> None:
    q = DNSRecord.question("v6.test", "AAAA")
    r = q.reply()
    r.add_answer(RR("v6.test", QTYPE.AAAA, ttl=5, rdata=AAAA("2001:db8::1")))
    data = bytes(r.pack())
    assert wire.answer_details(data, wire.parse_message(data)).ips == ("2001:db8::1",)


def test_an_error_reply_echoes_the_question_with_the_rcode() -> None:
    q = wire.parse_query(query("cnn.com"))
    reply = DNSRecord.parse(wire.error_reply(q, wire.RCODE_REFUSED))
    assert reply.header.id == q.id and reply.header.qr == 1 and reply.header.rcode == RCODE.REFUSED
    assert str(reply.q.qname) == "cnn.com." and reply.header.rd == 1
    assert not reply.rr


def test_with_id_rewrites_only_the_id() -> None:
    data = query()
    assert wire.with_id(data, 0xBEEF)[:2] == b"\xbe\xef" and wire.with_id(data, 0xBEEF)[2:] == data[2:]


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_either_parse_or_raise_malformed(data: bytes) -> None:
    try:
        msg = wire.parse_message(data)
    except wire.Malformed:
        return
    wire.answer_details(data, msg)  # and reading the answers never crashes either


def _mutations() -> st.SearchStrategy[bytes]:
    base = st.sampled_from(
        [
            query(),
            query("a.b.c.d.e.f.example.test", "AAAA"),
            answer("api.github.com", RR("api.github.com", QTYPE.A, ttl=3, rdata=A("198.51.100.10")))[0],
        ]
    )

    def mutate(args: tuple[bytes, int, int, bytes]) -> bytes:
        data, at, cut, patch = args
        at %= len(data)
        return data[:at] + patch + data[at + cut :]

    return st.tuples(base, st.integers(0, 200), st.integers(0, 4), st.binary(max_size=6)).map(mutate)


@settings(max_examples=1500, deadline=None)
@given(_mutations())
def test_mutated_messages_either_parse_or_raise_malformed(data: bytes) -> None:
    try:
        msg = wire.parse_message(data)
    except wire.Malformed:
        return
    d = wire.answer_details(data, msg)
    assert d.ttl >= 0
    try:
        DNSRecord.parse(data)  # what we accept, dnslib can read too (our rules are stricter)
    except Exception as err:  # pragma: no cover - a disagreement is a bug in one of the two
        if "Invalid label" not in str(err):  # dnslib refuses non-UTF-8 labels we escape
            raise

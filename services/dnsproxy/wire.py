"""DNS messages on the wire, read strictly: the proxy's security boundary.

A query is accepted only if it is a well-formed standard query with exactly one question, every
record of every section inside the message, no bytes after the last record, no label over 63
bytes, no name over 255, and compression pointers that only point backwards (so no loops). Names
are returned in presentation form, lower-cased and fully qualified; a byte that is not a letter,
digit, `-` or `_` is escaped (`\\.`, `\\032`) the way miekg/dns prints it, so a label holding a
dot can never pass for two labels (`api\\.github.com.` is not `api.github.com.`).

Answers are read the same way; `answer_details` collapses CNAME chains as Cilium's
`ExtractMsgDetails` does (the IPs belong to the query name, the TTL is the lowest of the chain).
Pure functions: no sockets, no dnslib on the packet path (dnslib builds the tests' messages).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("!HHHHHH")
RR_FIXED = struct.Struct("!HHIH")
MAX_UDP_QUERY = 4096  # larger "queries" are dropped as oversized (EDNS buffers top out at 4096)
MAX_MESSAGE = 65535
MAX_NAME = 255
MAX_LABEL = 63
MAX_POINTER_HOPS = 64

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_REFUSED = 5

FLAG_QR = 0x8000
FLAG_TC = 0x0200
FLAG_RD = 0x0100
OPCODE_MASK = 0x7800

# Cilium's --tofqdns-dns-reject-response-code values.
REJECT_CODES = {"refused": RCODE_REFUSED, "nameerror": RCODE_NXDOMAIN}

QTYPE_NAMES: dict[int, str] = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    35: "NAPTR",
    41: "OPT",
    43: "DS",
    46: "RRSIG",
    48: "DNSKEY",
    64: "SVCB",
    65: "HTTPS",
    99: "SPF",
    252: "AXFR",
    255: "ANY",
    257: "CAA",
}

_PLAIN_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
_PLAIN = frozenset(_PLAIN_BYTES)
_ESCAPED = {ord(c): "\\" + c for c in '.\\"();@$ '}


class Malformed(ValueError):
    """A message the proxy will not handle; `reason` is the metric label it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def qtype_name(qtype: int) -> str:
    return QTYPE_NAMES.get(qtype, f"TYPE{qtype}")


def _label_text(raw: bytes) -> str:
    if not raw.translate(None, _PLAIN_BYTES):  # the usual case: letters, digits, - and _ only
        return raw.decode("ascii").lower()
    out = []
    for b in raw:
        if b in _PLAIN:
            out.append(chr(b).lower())
        elif b in _ESCAPED:
            out.append(_ESCAPED[b])
        elif 0x21 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def read_name(buf: bytes, off: int, memo: dict[int, str] | None = None) -> tuple[str, int]:
    """The name at `off` (presentation form, lower-case, trailing dot) and the offset after it.

    `memo` (offset -> name, per message) spares decoding a compressed name's target again."""
    labels: list[str] = []
    wire_len = 0
    end = -1
    hops = 0
    pos = off
    limit = len(buf)
    suffix = ""
    while True:
        if pos >= limit:
            raise Malformed("truncated", f"name at {off} runs past the message")
        n = buf[pos]
        if n == 0:
            wire_len += 1
            if end < 0:
                end = pos + 1
            break
        kind = n & 0xC0
        if kind == 0xC0:
            if pos + 1 >= limit:
                raise Malformed("truncated", f"pointer at {pos} runs past the message")
            target = ((n & 0x3F) << 8) | buf[pos + 1]
            if target >= pos:  # only backwards: a loop or a forward pointer is refused
                raise Malformed("compression", f"pointer at {pos} to {target}")
            hops += 1
            if hops > MAX_POINTER_HOPS:
                raise Malformed("compression", "too many pointers")
            if end < 0:
                end = pos + 2
            if memo is not None and target in memo:
                suffix = memo[target]
                # the memoised name was checked when read; only the total length needs adding
                wire_len += _wire_len(suffix)
                if wire_len > MAX_NAME:
                    raise Malformed("name-too-long", f"name at {off}")
                break
            pos = target
            continue
        if kind:
            raise Malformed("label", f"label type {kind:#x} at {pos}")
        if pos + 1 + n > limit:
            raise Malformed("truncated", f"label at {pos} runs past the message")
        wire_len += n + 1
        if wire_len > MAX_NAME:
            raise Malformed("name-too-long", f"name at {off}")
        labels.append(_label_text(buf[pos + 1 : pos + 1 + n]))
        pos += n + 1
    if suffix:
        name = ".".join(labels) + "." + suffix if labels else suffix
    else:
        name = ".".join(labels) + "." if labels else "."
    if memo is not None:
        memo[off] = name
    return name, end


def _wire_len(name: str) -> int:
    """The wire length of a name read by `read_name` (escapes count as one byte)."""
    if name == ".":
        return 1
    text = name
    if "\\" in text:
        text = re.sub(r"\\(\d{3}|.)", "x", text)
    return len(text) + 1


@dataclass(frozen=True)
class Question:
    name: str
    qtype: int
    qclass: int

    @property
    def type_name(self) -> str:
        return qtype_name(self.qtype)


@dataclass(frozen=True)
class Query:
    """A client's query as the proxy forwards it (`raw` unchanged) and judges it (`question`)."""

    id: int
    flags: int
    question: Question
    question_end: int  # offset just after the question (to echo it in a reject)
    raw: bytes

    @property
    def name(self) -> str:
        return self.question.name


@dataclass
class Record:
    name: str
    rtype: int
    ttl: int
    rdata_off: int
    rdlength: int


@dataclass
class Message:
    id: int
    flags: int
    question: Question | None
    question_end: int
    answers: list[Record] = field(default_factory=list)
    memo: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def rcode(self) -> int:
        return self.flags & 0x000F

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TC)


def _skip_records(buf: bytes, off: int, count: int, keep: list[Record] | None, memo: dict[int, str]) -> int:
    limit = len(buf)
    for _ in range(count):
        name, off = read_name(buf, off, memo)
        if off + 10 > limit:
            raise Malformed("truncated", f"record header at {off}")
        rtype, _rclass, ttl, rdlength = RR_FIXED.unpack_from(buf, off)
        off += 10
        if off + rdlength > limit:
            raise Malformed("truncated", f"record data at {off} ({rdlength} bytes)")
        if keep is not None:
            keep.append(Record(name, rtype, ttl, off, rdlength))
        off += rdlength
    return off


def parse_message(buf: bytes, max_size: int = MAX_MESSAGE) -> Message:
    """Read a whole message strictly (see the module docstring); raises `Malformed`."""
    if len(buf) > max_size:
        raise Malformed("oversized", f"{len(buf)} bytes")
    if len(buf) < HEADER.size:
        raise Malformed("truncated", "shorter than a header")
    mid, flags, qd, an, ns, ar = HEADER.unpack_from(buf, 0)
    if qd > 1:
        raise Malformed("counts", f"{qd} questions")
    off = HEADER.size
    question = None
    memo: dict[int, str] = {}
    if qd:
        name, off = read_name(buf, off, memo)
        if off + 4 > len(buf):
            raise Malformed("truncated", "question type and class")
        qtype, qclass = struct.unpack_from("!HH", buf, off)
        off += 4
        question = Question(name, qtype, qclass)
    qend = off
    msg = Message(mid, flags, question, qend, memo=memo)
    off = _skip_records(buf, off, an, msg.answers, memo)
    off = _skip_records(buf, off, ns + ar, None, memo)
    if off != len(buf):
        raise Malformed("counts", f"{len(buf) - off} bytes after the last record")
    return msg


def parse_query(buf: bytes, max_size: int = MAX_UDP_QUERY) -> Query:
    """A client's query: a standard query (QR=0, opcode QUERY) with one question."""
    msg = parse_message(buf, max_size)
    if msg.is_response:
        raise Malformed("not-a-query", "QR bit set")
    if msg.flags & OPCODE_MASK:
        raise Malformed("not-a-query", f"opcode {(msg.flags & OPCODE_MASK) >> 11}")
    if msg.question is None:
        raise Malformed("counts", "no question")
    return Query(msg.id, msg.flags, msg.question, msg.question_end, buf)


@dataclass(frozen=True)
class AnswerDetails:
    """What the proxy learns from an answer: `ips` for the query name, the lowest TTL, the CNAMEs."""

    qname: str
    ips: tuple[str, ...]
    ttl: int
    cnames: tuple[str, ...]
    rcode: int
    rrtypes: tuple[str, ...]
    error: str = ""  # an answer that breaks the chain: relayed, but nothing is learned from it


MAX_TTL = 0xFFFFFFFF


def answer_details(buf: bytes, msg: Message) -> AnswerDetails:
    """Collapse the answer as Cilium does: every record must belong to the current chain name."""
    qname = msg.question.name if msg.question else ""
    rrname = qname
    ttl = MAX_TTL
    ips: list[str] = []
    cnames: list[str] = []
    rrtypes: list[str] = []
    for rr in msg.answers:
        rrtypes.append(qtype_name(rr.rtype))
        if rr.name != rrname:
            return AnswerDetails(
                qname, (), 0, (), msg.rcode, tuple(rrtypes), f"unexpected name {rr.name} (chain at {rrname})"
            )
        data = buf[rr.rdata_off : rr.rdata_off + rr.rdlength]
        if rr.rtype == TYPE_A:
            if rr.rdlength != 4:
                return AnswerDetails(qname, (), 0, (), msg.rcode, tuple(rrtypes), "bad A record")
            ips.append(str(ipaddress.IPv4Address(data)))
            ttl = min(ttl, rr.ttl)
        elif rr.rtype == TYPE_AAAA:
            if rr.rdlength != 16:
                return AnswerDetails(qname, (), 0, (), msg.rcode, tuple(rrtypes), "bad AAAA record")
            ips.append(str(ipaddress.IPv6Address(data)))
            ttl = min(ttl, rr.ttl)
        elif rr.rtype == TYPE_CNAME:
            target, end = read_name(buf, rr.rdata_off, msg.memo)
            if end != rr.rdata_off + rr.rdlength:
                return AnswerDetails(qname, (), 0, (), msg.rcode, tuple(rrtypes), "bad CNAME record")
            cnames.append(target)
            rrname = target
            ttl = min(ttl, rr.ttl)
    return AnswerDetails(qname, tuple(ips), ttl, tuple(cnames), msg.rcode, tuple(rrtypes))


def error_reply(query: Query, rcode: int) -> bytes:
    """A reply carrying only the question and `rcode` (REFUSED, NXDOMAIN, SERVFAIL), as miekg's SetRcode."""
    flags = FLAG_QR | (query.flags & (OPCODE_MASK | FLAG_RD)) | (rcode & 0x0F)
    return HEADER.pack(query.id, flags, 1, 0, 0, 0) + query.raw[HEADER.size : query.question_end]


def with_id(buf: bytes, mid: int) -> bytes:
    """The message with its ID replaced (the upstream query's ID differs from the client's)."""
    return struct.pack("!H", mid) + buf[2:]


def same_question(msg: Message, q: Question) -> bool:
    """An upstream reply must answer exactly what was asked (names compare case-insensitively)."""
    return (
        msg.question is not None
        and msg.question.name == q.name
        and msg.question.qtype == q.qtype
        and msg.question.qclass == q.qclass
    )

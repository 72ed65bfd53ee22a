"""Key shapes both backends accept, and the reversible mapping of a key's path to a NATS KV key.

A key is `<bucket>/<path>`: the bucket is letters, digits, '-' or '_' (a NATS bucket name, and a
plain prefix in etcd); the path is one or more non-empty '/'-separated segments of any characters.
A prefix starts with a whole bucket (`identities`, `identities/`, `identities/lab`) and matches the
keys that start with it, the bucket name taken as `<bucket>/`.

On NATS each path segment becomes one subject token, joined by '.', so a prefix made of whole
segments is a server-side subject filter. Letters, digits, '-' and '_' stand for themselves; every
other character is written as '=' and two hex digits per UTF-8 byte ('.' -> '=2E', '=' -> '=3D'),
which keeps tokens inside the characters NATS KV keys allow ([-/_=.a-zA-Z0-9]).
"""

from __future__ import annotations

import re
import string

from cilia.kvstore.errors import InvalidKeyError

_BUCKET = re.compile(r"[A-Za-z0-9_-]+")
_SAFE = frozenset(string.ascii_letters + string.digits + "-_")
_ESCAPE = re.compile(r"(?:=[0-9A-F]{2})+")


def _check_bucket(bucket: str, key: str) -> None:
    if not _BUCKET.fullmatch(bucket):
        raise InvalidKeyError(key, "the first segment must be a bucket name of letters, digits, '-' or '_'")


def split_key(key: str) -> tuple[str, str]:
    """`'identities/labels/ab'` -> `('identities', 'labels/ab')`; InvalidKeyError if the key is malformed."""
    bucket, _, path = key.partition("/")
    _check_bucket(bucket, key)
    if not path:
        raise InvalidKeyError(key, "a key needs a path after its bucket")
    if "" in path.split("/"):
        raise InvalidKeyError(key, "a path segment is empty (a leading, trailing or doubled '/')")
    return bucket, path


def split_prefix(prefix: str) -> tuple[str, str]:
    """`'identities/lab'` -> `('identities', 'lab')`; `'identities'` and `'identities/'` -> `('identities', '')`."""
    bucket, _, rest = prefix.partition("/")
    _check_bucket(bucket, prefix)
    if "" in rest.split("/")[:-1]:
        raise InvalidKeyError(prefix, "a path segment is empty (a leading or doubled '/')")
    return bucket, rest


def full_prefix(prefix: str) -> str:
    """The string every matching key starts with: the prefix with its bucket written as `<bucket>/`."""
    bucket, rest = split_prefix(prefix)
    return f"{bucket}/{rest}"


def encode_segment(segment: str) -> str:
    """One path segment as a NATS subject token (see the module docstring)."""
    return "".join(c if c in _SAFE else "".join(f"={b:02X}" for b in c.encode()) for c in segment)


def decode_segment(token: str) -> str:
    """The path segment a token stands for; ValueError if the token was not written by `encode_segment`."""
    if not token or any(c not in _SAFE and c != "=" for c in token):
        raise ValueError(f"not an encoded path segment: {token!r}")
    plain = _ESCAPE.sub(lambda m: bytes.fromhex(m.group().replace("=", "")).decode(), token)
    if encode_segment(plain) != token:  # stray '=' or escapes of characters that needed none
        raise ValueError(f"not an encoded path segment: {token!r}")
    return plain


def nats_key(path: str) -> str:
    """`'labels/10.0.0.1'` -> `'labels.10=2E0=2E0=2E1'`."""
    return ".".join(encode_segment(segment) for segment in path.split("/"))


def path_of_nats_key(nats_key: str) -> str:
    """The inverse of `nats_key`; ValueError for a NATS key this mapping did not write."""
    return "/".join(decode_segment(token) for token in nats_key.split("."))


def nats_filter(rest: str) -> str:
    """The subject filter (below `$KV.<bucket>.`) for a prefix's path: its whole segments, then '>'.

    The last, possibly partial, segment is matched on the client: `'labels/ab'` -> `'labels.>'`.
    """
    whole = rest.split("/")[:-1]
    return ".".join([*(encode_segment(segment) for segment in whole), ">"])

"""Typed errors of the kvstore: each names the key, lease or server involved and says what to do next."""

from __future__ import annotations

from cilia.errors import CiliaError


class KVError(CiliaError):
    """Base class of every kvstore error; `str(err)` is one readable line."""


class InvalidKeyError(KVError, ValueError):
    """A key or prefix does not have the `<bucket>/<path>` shape both backends agree on."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(
            f"invalid kvstore key {key!r}: {reason} (keys look like '<bucket>/<path>', e.g. 'identities/labels/ab12')"
        )


class KeyExistsError(KVError):
    """`create` found the key already present."""

    def __init__(self, key: str, revision: int) -> None:
        self.key = key
        self.revision = revision
        super().__init__(
            f"key {key!r} already exists at revision {revision}: get() it, or change it with update()"
        )


class RevisionMismatchError(KVError):
    """A compare-and-set found the key at another revision (`actual` is None when the key is absent)."""

    def __init__(self, key: str, expected: int, actual: int | None) -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        now = "does not exist" if actual is None else f"is at revision {actual}"
        super().__init__(
            f"key {key!r} {now}, not revision {expected}: it changed since it was read; get() it again and retry"
        )


class LeaseExpiredError(KVError):
    """The lease has expired, was revoked, or is unknown to this store; its keys are gone."""

    def __init__(self, lease_id: int, detail: str = "") -> None:
        self.lease_id = lease_id
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"lease {lease_id:x} has expired or was revoked{extra}: grant() a new lease and put its keys again"
        )


class KVUnavailableError(KVError):
    """The kvstore server could not be reached or did not answer in time."""

    def __init__(self, backend: str, url: str, detail: str, hint: str = "") -> None:
        self.backend = backend
        self.url = url
        self.detail = detail
        settings = "CILIA_KVSTORE / CILIA_NATS_URL point" if backend == "NATS" else "CILIA_KVSTORE points"
        check = hint or f"check that {backend} is running and reachable at {url}, and that {settings} at it"
        super().__init__(f"{backend} kvstore at {url} is unavailable ({detail}): {check}")

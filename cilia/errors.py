"""Typed errors of the core: each names what is wrong and where, in one readable line."""

from __future__ import annotations


class CiliaError(Exception):
    """Base class: `str(err)` is the one line a user sees."""


class PolicyError(CiliaError):
    """A policy is invalid: `path` is the field path (`spec.ingress[0].toPorts`), `message` what is wrong."""

    def __init__(self, path: str, message: str, document: str = "") -> None:
        self.path = path
        self.message = message
        self.document = document
        super().__init__(self.line())

    def with_document(self, document: str) -> PolicyError:
        return PolicyError(self.path, self.message, document)

    def line(self) -> str:
        if self.message.startswith(("not supported by cilia", "unknown field")):
            body = f"{self.message}: {self.path}" if self.path else self.message
        else:
            body = f"{self.path}: {self.message}" if self.path else self.message
        return f"{self.document}: {body}" if self.document else body


class ResourceError(CiliaError):
    """One or more documents of a batch failed validation; nothing of the batch is used."""

    def __init__(self, errors: list[PolicyError]) -> None:
        self.errors = errors
        first = errors[0].line() if errors else "invalid input"
        more = (
            f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        )
        super().__init__(first + more)

    @property
    def path(self) -> str:
        return self.errors[0].path if self.errors else ""

    @property
    def document(self) -> str:
        return self.errors[0].document if self.errors else ""


class ScenarioError(CiliaError):
    """A scenario file is malformed (not a policy problem: pods, probes, steps)."""

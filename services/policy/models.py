"""Payloads of the policy service on the bus."""

from __future__ import annotations

from pydantic import BaseModel


class RevisionEvent(BaseModel):
    revision: int

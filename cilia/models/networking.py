"""`networking.k8s.io/v1` NetworkPolicy, as Kubernetes defines it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from cilia.models.cilium import CIDR, _check_port
from cilia.models.meta import LabelSelector, ObjectMeta, Strict


def _int_or_name(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be 1-65535 or a port name")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise ValueError("must be 1-65535 or a port name")
        return str(value)
    if isinstance(value, str):
        if value.isdigit():
            raise ValueError("must be an integer or a port name, not a numeric string")
        return _check_port(value)
    raise ValueError("must be 1-65535 or a port name")


class IPBlock(Strict):
    cidr: CIDR
    except_: list[CIDR] | None = Field(default=None, alias="except")


class NetworkPolicyPeer(Strict):
    podSelector: LabelSelector | None = None
    namespaceSelector: LabelSelector | None = None
    ipBlock: IPBlock | None = None

    @model_validator(mode="after")
    def _kinds(self) -> NetworkPolicyPeer:
        if self.ipBlock is not None and (self.podSelector is not None or self.namespaceSelector is not None):
            raise ValueError("may not specify both ipBlock and another peer")
        if self.ipBlock is None and self.podSelector is None and self.namespaceSelector is None:
            raise ValueError("must specify a peer")
        return self


class NetworkPolicyPort(Strict):
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    port: Annotated[str, BeforeValidator(_int_or_name)] | None = None
    endPort: int | None = Field(default=None, ge=1, le=65535)

    @model_validator(mode="after")
    def _range(self) -> NetworkPolicyPort:
        if self.endPort is not None:
            if self.port is None or not self.port.isdigit():
                raise ValueError("endPort: may not be specified when port is not a number")
            if self.endPort < int(self.port):
                raise ValueError("endPort: must be greater than or equal to port")
        return self


class NetworkPolicyIngressRule(Strict):
    ports: list[NetworkPolicyPort] | None = None
    from_: list[NetworkPolicyPeer] | None = Field(default=None, alias="from")


class NetworkPolicyEgressRule(Strict):
    ports: list[NetworkPolicyPort] | None = None
    to: list[NetworkPolicyPeer] | None = None


class NetworkPolicySpec(Strict):
    podSelector: LabelSelector
    ingress: list[NetworkPolicyIngressRule] | None = None
    egress: list[NetworkPolicyEgressRule] | None = None
    policyTypes: list[Literal["Ingress", "Egress"]] | None = None

    @field_validator("policyTypes")
    @classmethod
    def _types(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("duplicate policy type")
        return v

    def effective_policy_types(self) -> set[str]:
        """Kubernetes' defaulting: Ingress always, Egress when egress rules are present."""
        if self.policyTypes:
            return set(self.policyTypes)
        types = {"Ingress"}
        if self.egress:
            types.add("Egress")
        return types


class NetworkPolicy(Strict):
    apiVersion: Literal["networking.k8s.io/v1"]
    kind: Literal["NetworkPolicy"]
    metadata: ObjectMeta
    spec: NetworkPolicySpec
    status: dict[str, Any] | None = None

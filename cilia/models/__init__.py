"""Resource models: Cilium's CRDs, Kubernetes NetworkPolicy and cilia's own kinds, with the loader."""

from cilia.models.cilium import CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, Rule
from cilia.models.loader import (
    KINDS,
    POLICY_KINDS,
    document_name,
    load_documents,
    parse_document,
    parse_documents,
    parse_resources,
    resource_key,
)
from cilia.models.networking import NetworkPolicy
from cilia.models.workload import Endpoint, Identity

PolicyResource = CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy | NetworkPolicy

__all__ = [
    "KINDS",
    "POLICY_KINDS",
    "CiliumClusterwideNetworkPolicy",
    "CiliumNetworkPolicy",
    "Endpoint",
    "Identity",
    "NetworkPolicy",
    "PolicyResource",
    "Rule",
    "document_name",
    "load_documents",
    "parse_document",
    "parse_documents",
    "parse_resources",
    "resource_key",
]

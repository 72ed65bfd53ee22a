"""Reading resources: multi-document YAML or JSON in, typed models out, all or nothing.

Every error names its document (`CiliumNetworkPolicy default/rule1`) and the field path
(`spec.ingress[0].toPorts[0].ports[0].port`). A batch with any invalid document raises
`ResourceError` and returns nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cilia.errors import PolicyError, ResourceError
from cilia.models.cilium import NOT_SUPPORTED, CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy
from cilia.models.networking import NetworkPolicy
from cilia.models.services import (
    ALPHA,
    CiliumBGPPeeringPolicy,
    CiliumL2AnnouncementPolicy,
    CiliumLoadBalancerIPPool,
    Service,
)
from cilia.models.validation import validate_resource
from cilia.models.workload import Endpoint, Identity

# (apiVersion, kind) -> model.
KINDS: dict[tuple[str, str], type[BaseModel]] = {
    ("cilium.io/v2", "CiliumNetworkPolicy"): CiliumNetworkPolicy,
    ("cilium.io/v2", "CiliumClusterwideNetworkPolicy"): CiliumClusterwideNetworkPolicy,
    ("networking.k8s.io/v1", "NetworkPolicy"): NetworkPolicy,
    ("cilia.io/v1", "Endpoint"): Endpoint,
    ("cilia.io/v1", "Identity"): Identity,
    ("v1", "Service"): Service,
    (ALPHA, "CiliumLoadBalancerIPPool"): CiliumLoadBalancerIPPool,
    (ALPHA, "CiliumL2AnnouncementPolicy"): CiliumL2AnnouncementPolicy,
    (ALPHA, "CiliumBGPPeeringPolicy"): CiliumBGPPeeringPolicy,
}
CLUSTER_SCOPED = {
    "CiliumClusterwideNetworkPolicy",
    "Identity",
    "CiliumLoadBalancerIPPool",
    "CiliumL2AnnouncementPolicy",
    "CiliumBGPPeeringPolicy",
}
POLICY_KINDS = {"CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy"}

# Semantic checks run after a document parses; each raises PolicyError(path, message).
_post_checks: list[Callable[[BaseModel], None]] = [validate_resource]


def load_documents(text: str, origin: str = "<input>") -> list[Any]:
    """Split YAML (multi-document) or JSON text into raw documents; `kind: List` is flattened."""
    stripped = text.lstrip()
    try:
        if stripped.startswith(("{", "[")):
            loaded = json.loads(text)
            docs = loaded if isinstance(loaded, list) else [loaded]
        else:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ResourceError([PolicyError("", f"cannot parse {origin}: {_one_line(str(err))}")]) from None
    out: list[Any] = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out.extend(doc["items"])
        else:
            out.append(doc)
    return out


def document_name(doc: Any, index: int) -> str:
    """`Kind namespace/name` (namespaced kinds default to namespace `default`), or `document N`."""
    if not isinstance(doc, dict):
        return f"document {index + 1}"
    raw_meta = doc.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    name = meta.get("name")
    if not doc.get("kind"):
        return (
            f"document {index + 1} ({meta.get('namespace') or 'default'}/{name})"
            if name
            else f"document {index + 1}"
        )
    kind = doc["kind"]
    if kind == "Identity" and "id" in doc:
        return f"Identity {doc['id']}"
    if not name:
        return f"{kind} (document {index + 1})"
    if kind in CLUSTER_SCOPED:
        return f"{kind} {name}"
    return f"{kind} {meta.get('namespace') or 'default'}/{name}"


def parse_document(doc: Any, index: int = 0, kinds: Iterable[str] | None = None) -> BaseModel:
    """Parse one raw document into its model, running the registered semantic checks."""
    name = document_name(doc, index)
    if not isinstance(doc, dict):
        raise PolicyError("", "a document must be a mapping with apiVersion and kind", name)
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not api_version or not kind:
        raise PolicyError("", "apiVersion and kind are required", name)
    model = KINDS.get((api_version, kind))
    if model is None:
        known = sorted({k for _, k in KINDS})
        if any(k == kind for _, k in KINDS):
            raise PolicyError("apiVersion", f"unsupported apiVersion {api_version!r} for kind {kind}", name)
        raise PolicyError("kind", f"unknown kind {kind!r} (known: {', '.join(known)})", name)
    if kinds is not None and kind not in set(kinds):
        raise PolicyError("kind", f"kind {kind} is not accepted here", name)
    try:
        obj = model.model_validate(doc)
    except ValidationError as err:
        raise _convert(err, name) from None
    for check in _post_checks:
        try:
            check(obj)
        except PolicyError as perr:
            raise perr.with_document(name) from None
    return obj


def parse_resources(
    text: str, origin: str = "<input>", kinds: Iterable[str] | None = None
) -> list[BaseModel]:
    """Parse every document of `text`; any invalid document rejects the whole batch."""
    docs = load_documents(text, origin)
    return parse_documents(docs, kinds)


def parse_documents(docs: list[Any], kinds: Iterable[str] | None = None) -> list[BaseModel]:
    out: list[BaseModel] = []
    errors: list[PolicyError] = []
    for i, doc in enumerate(docs):
        try:
            out.append(parse_document(doc, i, kinds))
        except ResourceError as err:
            errors.extend(err.errors)
        except PolicyError as err:
            errors.append(err if err.document else err.with_document(document_name(doc, i)))
    if errors:
        raise ResourceError(errors)
    return out


def resource_key(obj: BaseModel) -> tuple[str, str, str]:
    """(kind, namespace, name): the identity of a resource for create-or-replace."""
    kind = str(getattr(obj, "kind", ""))
    meta = getattr(obj, "metadata", None)
    if meta is None:
        return (kind, "", str(getattr(obj, "id", "")))
    namespace = "" if kind in CLUSTER_SCOPED else (meta.namespace or "default")
    return (kind, namespace, meta.name or "")


# --- pydantic errors -> one readable line each --------------------------------------------------

_FIELD_PREFIX = re.compile(
    r"^((?:[A-Za-z_][A-Za-z0-9_]*|\[\d+\])(?:\[\d+\])?(?:\.[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?)*): (.*)$", re.S
)
_TYPE_MESSAGES = {
    "model_type": "must be an object",
    "dict_type": "must be an object",
    "model_attributes_type": "must be an object",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "missing": "required field is missing",
    "extra_forbidden": "unknown field",
}


def _is_union_tag(item: Any) -> bool:
    return isinstance(item, str) and (
        "[" in item
        or item in ("int", "str", "bool", "float", "list", "dict", "none")
        or item.startswith("function-")
    )


def format_path(loc: Iterable[Any]) -> str:
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif _is_union_tag(item):
            continue
        else:
            name = "except" if item == "except_" else ("from" if item == "from_" else str(item))
            out += f".{name}" if out else name
    return out


def _message(error: Any) -> str:
    etype = error.get("type", "")
    msg = str(error.get("msg", ""))
    if etype in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[etype]
    if etype == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"unsupported value {error.get('input')!r}, must be one of {expected}"
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    if msg.startswith("Input should be "):
        return "must be " + msg[len("Input should be ") :]
    return msg


def _convert(err: ValidationError, document: str) -> ResourceError:
    errors: list[PolicyError] = []
    seen: set[tuple[str, str]] = set()
    # Unions report one error per member; keep the most specific (deepest) ones.
    raw = sorted(err.errors(), key=lambda e: -len(e.get("loc", ())))
    for e in raw:
        path = format_path(e.get("loc", ()))
        msg = _message(e)
        m = _FIELD_PREFIX.match(msg)
        if m and not msg.startswith(NOT_SUPPORTED):
            sep = "" if m.group(1).startswith("[") or not path else "."
            path = f"{path}{sep}{m.group(1)}"
            msg = m.group(2)
        if e.get("type") == "literal_error" and re.search(r"(from|to)Entities\[\d+\]$", path):
            msg = f"unsupported entity: {e.get('input')}"
        if e.get("type") == "literal_error" and path.endswith(".family"):
            msg = f"wrong family: {e.get('input')}"
        key = (path, msg)
        if key in seen or any(p.startswith(path + ".") or p.startswith(path + "[") for p, _ in seen):
            continue
        seen.add(key)
        errors.append(PolicyError(path, msg, document))
    errors.sort(key=lambda pe: pe.path)
    return ResourceError(errors)


def _one_line(text: str) -> str:
    return " ".join(text.split())

"""`cilia apply -f FILE`: any cilia resource, each document sent to the service that owns it."""

from __future__ import annotations

import click

from cilia.cli.client import Client
from cilia.cli.policy import read_input
from cilia.errors import CiliaError
from cilia.models.loader import POLICY_KINDS, load_documents, parse_documents
from cilia.models.loader import document_name as doc_name
from cilia.models.services import LBIPAM_KINDS

# kind -> the service that owns it.
OWNERS: dict[str, str] = {kind: "policy" for kind in POLICY_KINDS} | {kind: "lbipam" for kind in LBIPAM_KINDS}


def apply_policies(client: Client, text: str) -> list[str]:
    """Send policy documents to the policy service; kubectl-style lines back."""
    reply = client.request("policy", "POST", "/v1/policies", content=text, content_type="application/yaml")
    lines = []
    for c in reply.get("changes", []):
        lines.append(
            f"{c['kind'].lower()}.cilium.io/{c['name']} {c['action']}"
            if c["kind"] != "NetworkPolicy"
            else f"networkpolicy.networking.k8s.io/{c['name']} {c['action']}"
        )
    return lines


@click.command("apply")
@click.option("-f", "--filename", required=True, help="YAML or JSON file of resources, or - for stdin.")
@click.pass_obj
def apply(client: Client, filename: str) -> None:
    """Create or replace resources, kubectl-style; each document goes to the service that owns its kind.

    The whole file is validated first: if any document is invalid or of an unknown kind, nothing
    is applied.
    """
    text, origin = read_input(filename)
    docs = load_documents(text, origin)
    for i, doc in enumerate(docs):
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind not in OWNERS:
            raise CiliaError(
                f"{doc_name(doc, i)}: cilia does not manage kind {kind!r} (known: {', '.join(sorted(OWNERS))})"
            )
    parse_documents(docs)
    by_service: dict[str, list[object]] = {}
    for doc in docs:
        by_service.setdefault(OWNERS[doc["kind"]], []).append(doc)
    import yaml

    for service, items in by_service.items():
        body = yaml.safe_dump_all(items, sort_keys=False)
        if service == "policy":
            for line in apply_policies(client, body):
                click.echo(line)
        elif service == "lbipam":
            from cilia.cli.lbipam import apply_lbipam

            for line in apply_lbipam(client, body):
                click.echo(line)

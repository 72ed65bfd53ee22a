"""Generate the Python gRPC client of gobgpd (`gobgpapi`) from the .proto files Debian ships in
golang-github-osrg-gobgp-dev, into the running interpreter's site-packages. Nothing generated is
committed; `make bootstrap` (and the Dockerfile) run this. Quick when the stubs are already current.

    python scripts/gen_gobgp_api.py [--proto-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

PROTO_DIR = Path("/usr/share/gocode/src/github.com/osrg/gobgp/api")
PACKAGE = "gobgpapi"
PROTOS = ("gobgp.proto", "attribute.proto", "capability.proto")


def fingerprint(proto_dir: Path) -> str:
    import grpc_tools

    h = hashlib.sha256(getattr(grpc_tools, "__version__", "").encode())
    for name in PROTOS:
        h.update((proto_dir / name).read_bytes())
    return h.hexdigest()


def generate(proto_dir: Path, target: Path) -> bool:
    """Write the package; False if it was already current."""
    missing = [p for p in PROTOS if not (proto_dir / p).exists()]
    if missing:
        raise SystemExit(
            f"gen_gobgp_api: {', '.join(missing)} not in {proto_dir} (apt-get install golang-github-osrg-gobgp-dev)"
        )
    stamp = fingerprint(proto_dir)
    if (target / ".stamp").exists() and (target / ".stamp").read_text() == stamp:
        return False
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / PACKAGE
        out.mkdir()
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(proto_dir / p) for p in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("gen_gobgp_api: protoc failed")
        modules = [p.removesuffix(".proto") + "_pb2" for p in PROTOS]
        pattern = re.compile(rf"^import ({'|'.join(modules)})(_grpc)? as", re.M)
        for path in out.glob("*.py*"):
            path.write_text(pattern.sub(r"from . import \1\2 as", path.read_text()))
        (out / "__init__.py").write_text('"""gobgpd\'s gRPC API, generated from Debian\'s .proto files."""\n')
        (out / ".stamp").write_text(stamp)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(out, target)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR)
    args = parser.parse_args()
    target = Path(sysconfig.get_paths()["purelib"]) / PACKAGE
    if generate(args.proto_dir, target):
        print(f"gen_gobgp_api: wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main()

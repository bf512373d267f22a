"""Generate the Python protobuf and gRPC code in services/api from proto/.

Usage: python scripts/gen_proto.py [--check]

protoc writes modules that import each other as ``draftflow.v1.x_pb2``; we place them flat in
``services/api`` and rewrite those imports, so the API lives in the package every role shares.
With --check nothing is written; the exit code says whether services/api is up to date.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "services" / "api"
IMPORT_RE = re.compile(r"^from draftflow\.v1 import (\w+_pb2)", re.MULTILINE)


def generate() -> dict[str, str]:
    """Return {file name: content} of the generated modules."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the messages above")
        files = {}
        for path in sorted((Path(tmp) / "draftflow" / "v1").glob("*")):
            text = IMPORT_RE.sub(r"from services.api import \1", path.read_text())
            files[path.name] = text
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the code is fresh")
    args = parser.parse_args()
    files = generate()
    stale = [
        name for name, text in files.items()
        if not (OUT / name).exists() or (OUT / name).read_text() != text
    ]
    extra = [
        p.name for p in OUT.glob("*_pb2*") if p.name not in files
    ]
    if args.check:
        if stale or extra:
            print(f"stale: {stale + extra}; run: python scripts/gen_proto.py", file=sys.stderr)
            return 1
        return 0
    for name in extra:
        (OUT / name).unlink()
    for name, text in files.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(files)} files to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

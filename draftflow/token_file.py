"""Give a deployment one bearer token without asking anyone for it.

``python -m draftflow.token_file PATH`` (compose's ``token`` service) writes ``DRAFTFLOW_TOKEN``
into PATH when it is given, keeps the token already in PATH otherwise, and generates one on
first start. Every role then reads PATH through ``DRAFTFLOW_TOKEN_FILE``.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path


def ensure(path: Path, given: str | None) -> tuple[str, str]:
    """Make ``path`` hold the deployment's token; return (token, how it was chosen)."""
    if given:
        how = "given (DRAFTFLOW_TOKEN)"
        token = given
    else:
        try:
            existing = path.read_text().strip()
        except FileNotFoundError:
            existing = ""
        if existing:
            return existing, "kept"
        how = "generated"
        token = secrets.token_hex(16)
    # Written beside and renamed: a role starting meanwhile never reads half a token.
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token, how


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m draftflow.token_file PATH", file=sys.stderr)
        return 2
    path = Path(argv[0])
    _, how = ensure(path, os.environ.get("DRAFTFLOW_TOKEN"))
    # The token itself is not printed: logs are read by more people than the token is for.
    print(f"token in {path}: {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

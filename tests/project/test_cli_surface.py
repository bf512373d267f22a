"""The command-line surface is frozen: adding or renaming a flag is a deliberate change.

After such a change, refresh the record with:
    .venv/bin/python tests/project/test_cli_surface.py --update
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECORD = Path(__file__).with_name("cli_surface.json")


def surface() -> dict[str, list[str]]:
    from draftflow.cli import build_parser

    out: dict[str, list[str]] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        flags: list[str] = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}".strip())
            elif action.option_strings:
                flags.extend(action.option_strings)
            else:
                flags.append(f"<{action.dest}>")
        out[name or "draftflow"] = sorted(flags)

    walk(build_parser(), "")
    return dict(sorted(out.items()))


def test_cli_surface_is_unchanged() -> None:
    recorded = json.loads(RECORD.read_text())
    assert surface() == recorded, (
        "the CLI changed; if that is intended, run: "
        ".venv/bin/python tests/project/test_cli_surface.py --update"
    )


if __name__ == "__main__":
    if "--update" in sys.argv:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        RECORD.write_text(json.dumps(surface(), indent=2) + "\n")
        print(f"wrote {RECORD}")

"""What ships inside the ``draftflow`` package, and where ``draftflow up`` writes by default.

The example run configs and dataset are package data (``draftflow/examples``, the repository's
``examples/`` directory), so an installed ``draftflow`` finds them without a source checkout.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent / "examples"
"""The bundled example configs and their dataset (``data/conversations.jsonl``)."""

DEFAULT_CONFIG = EXAMPLES / "tiny.yaml"
"""The run ``draftflow up`` trains when given no config: a tiny target built locally."""

DEFAULT_WORKDIR = Path(".draftflow")
"""``draftflow up``'s database, logs, tiny target, checkpoints and export: under the current
directory, never inside the installed package."""

TINY_TARGET = "tiny-target"
"""Directory name, in the work directory, of the tiny target the bundled examples train."""

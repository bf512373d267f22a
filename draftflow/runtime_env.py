"""Environment settings every ``draftflow`` command applies before it parses its flags.

- ``DRAFTFLOW_TOKEN_FILE``: a file holding the bearer token, read when ``DRAFTFLOW_TOKEN`` is
  not given (a given ``DRAFTFLOW_TOKEN`` wins). Compose shares a generated token this way.
- ``DRAFTFLOW_CPU_PROCESSES``: how many CPU-bound processes share this machine's cores; each
  then runs ``cores / N`` threads (``OMP_NUM_THREADS``), as ``draftflow up`` splits them.
  An ``OMP_NUM_THREADS`` already set wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path


class SettingError(ValueError):
    """A setting in the environment cannot be used; the message says which and why."""


def usable_cores() -> int:
    """Cores this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_env(processes: int) -> dict[str, str]:
    """``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` giving each of ``processes`` its share.

    Each torch process otherwise starts one thread per core; a producer and a trainer on the
    same cores then slow each other down several times over.
    """
    threads = str(max(1, usable_cores() // max(processes, 1)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def apply(environ: MutableMapping[str, str]) -> None:
    """Resolve ``DRAFTFLOW_TOKEN_FILE`` and ``DRAFTFLOW_CPU_PROCESSES`` into ``environ``."""
    token_file = environ.get("DRAFTFLOW_TOKEN_FILE")
    if token_file and not environ.get("DRAFTFLOW_TOKEN"):
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise SettingError(
                f"DRAFTFLOW_TOKEN_FILE {token_file} cannot be read ({exc.strerror}); "
                "create it, or set DRAFTFLOW_TOKEN instead") from None
        if not token:
            raise SettingError(f"DRAFTFLOW_TOKEN_FILE {token_file} is empty; write the "
                                    "token into it, or set DRAFTFLOW_TOKEN instead")
        environ["DRAFTFLOW_TOKEN"] = token
    processes = environ.get("DRAFTFLOW_CPU_PROCESSES")
    if processes and "OMP_NUM_THREADS" not in environ:
        try:
            count = int(processes)
        except ValueError:
            count = 0
        if count < 1:
            raise SettingError(f"DRAFTFLOW_CPU_PROCESSES={processes!r}: give a whole "
                                    "number of processes, 1 or more")
        environ.update(thread_env(count))

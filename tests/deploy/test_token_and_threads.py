"""The compose token (generated once, a given one wins) and the environment every command reads."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from draftflow import runtime_env, token_file

ROOT = Path(__file__).resolve().parents[2]


def test_token_is_generated_once_then_kept(tmp_path: Path) -> None:
    path = tmp_path / "token"
    first, how = token_file.ensure(path, None)
    assert how == "generated" and len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token_file.ensure(path, None) == (first, "kept")
    assert token_file.ensure(path, "") == (first, "kept")


def test_given_token_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    token_file.ensure(path, None)
    assert token_file.ensure(path, "mine") == ("mine", "given (DRAFTFLOW_TOKEN)")
    assert path.read_text() == "mine\n"
    assert [p.name for p in tmp_path.iterdir()] == ["token"]


def test_token_service_command_does_not_print_the_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    env = {**os.environ, "DRAFTFLOW_TOKEN": "not-in-logs"}
    done = subprocess.run([sys.executable, "-m", "draftflow.token_file", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout == f"token in {path}: given (DRAFTFLOW_TOKEN)\n"
    assert path.read_text() == "not-in-logs\n"


def test_token_file_fills_in_a_missing_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    environ = {"DRAFTFLOW_TOKEN_FILE": str(tmp_path / "token")}
    runtime_env.apply(environ)
    assert environ["DRAFTFLOW_TOKEN"] == "from-file"
    environ = {"DRAFTFLOW_TOKEN_FILE": str(tmp_path / "token"), "DRAFTFLOW_TOKEN": "given"}
    runtime_env.apply(environ)
    assert environ["DRAFTFLOW_TOKEN"] == "given"


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot be read (No such file or directory); create it, or set "
     "DRAFTFLOW_TOKEN instead"),
    ("\n", "is empty; write the token into it, or set DRAFTFLOW_TOKEN instead"),
])
def test_unusable_token_file_is_refused_with_the_fix(tmp_path: Path, content: str | None,
                                                     message: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(runtime_env.SettingError) as err:
        runtime_env.apply({"DRAFTFLOW_TOKEN_FILE": str(path)})
    assert str(err.value) == f"DRAFTFLOW_TOKEN_FILE {path} {message}"


def test_the_command_reports_an_unusable_token_file(tmp_path: Path) -> None:
    env = {**os.environ, "DRAFTFLOW_TOKEN_FILE": str(tmp_path / "missing")}
    env.pop("DRAFTFLOW_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "draftflow", "run", "list"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith(f"draftflow: DRAFTFLOW_TOKEN_FILE {tmp_path / 'missing'} ")


def test_cpu_processes_split_the_cores_as_up_does() -> None:
    cores = runtime_env.usable_cores()
    environ = {"DRAFTFLOW_CPU_PROCESSES": "2"}
    runtime_env.apply(environ)
    share = str(max(1, cores // 2))
    assert environ["OMP_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == share
    from draftflow.up import _thread_env

    if "OMP_NUM_THREADS" not in os.environ:
        assert _thread_env("cpu", 2) == {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share}


def test_a_set_thread_count_wins() -> None:
    environ = {"DRAFTFLOW_CPU_PROCESSES": "2", "OMP_NUM_THREADS": "7"}
    runtime_env.apply(environ)
    assert environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in environ


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_cpu_processes_is_refused(value: str) -> None:
    with pytest.raises(runtime_env.SettingError, match="give a whole number of processes"):
        runtime_env.apply({"DRAFTFLOW_CPU_PROCESSES": value})

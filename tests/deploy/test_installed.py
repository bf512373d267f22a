"""``draftflow`` installed from a wheel (not editable) finds its example and writes under the
current directory, never into the package or a source checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from draftflow import up
from draftflow.paths import DEFAULT_CONFIG, EXAMPLES, TINY_TARGET
from services.config import load_run_config

ROOT = Path(__file__).resolve().parents[2]

_CHECK = """
import json, sys
from pathlib import Path
from draftflow.paths import DEFAULT_CONFIG, DEFAULT_WORKDIR
from draftflow.up import UpOptions, _target_path
from services.config import load_run_config
from services.tiny_model import DEFAULT_DATASET
cfg = load_run_config(DEFAULT_CONFIG)
work = UpOptions().workdir.resolve()
print(json.dumps({
    "config": str(DEFAULT_CONFIG), "dataset": str(cfg.dataset_path(DEFAULT_CONFIG)),
    "dataset_exists": cfg.dataset_path(DEFAULT_CONFIG).is_file(),
    "tiny_dataset": str(DEFAULT_DATASET), "tiny_dataset_exists": DEFAULT_DATASET.is_file(),
    "work": str(work), "target": str(_target_path(DEFAULT_CONFIG, work)),
    "up_module": sys.modules["draftflow.up"].__file__,
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding draftflow's wheel; its dependencies come from this interpreter's
    site-packages (a .pth line), so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("installed")
    # Built from a copy: an in-tree build leaves build/ and *.egg-info in the checkout.
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", ".draftflow", "build", "dist", "*.egg-info", "__pycache__",
        ".*_cache", "tests", "bench", "models"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(src), "-w", str(tmp / "dist")],
                   check=True, timeout=300, capture_output=True, cwd=tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([venv / "bin" / "python", "-c", purelib], check=True,
                               capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((tmp / "dist").glob("draftflow-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=300, capture_output=True)
    return venv


def test_installed_package_finds_its_example_and_writes_under_the_cwd(installed: Path,
                                                                       tmp_path: Path) -> None:
    import json

    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([installed / "bin" / "python", "-c", _CHECK], cwd=empty,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["up_module"].startswith(str(installed)), seen
    assert seen["config"].startswith(str(installed)) and seen["dataset_exists"], seen
    assert seen["tiny_dataset"].startswith(str(installed)) and seen["tiny_dataset_exists"], seen
    assert seen["work"] == str(empty / ".draftflow")
    assert seen["target"] == str(empty / ".draftflow" / TINY_TARGET)
    assert list(empty.iterdir()) == []


def test_installed_help_runs_in_an_empty_directory(installed: Path, tmp_path: Path) -> None:
    done = subprocess.run([installed / "bin" / "draftflow", "up", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "bundled with draftflow" in " ".join(done.stdout.split())


def test_bundled_examples_are_the_repository_examples() -> None:
    assert EXAMPLES.resolve() == (ROOT / "examples").resolve()
    assert DEFAULT_CONFIG.is_file()


def test_a_bundled_examples_tiny_target_lives_in_the_work_directory(tmp_path: Path) -> None:
    # Reached through examples/ or through the package, the same work directory is used.
    for config in (ROOT / "examples" / "tiny.yaml", DEFAULT_CONFIG):
        assert up._target_path(config, tmp_path / "w") == tmp_path / "w" / TINY_TARGET


def test_other_configs_keep_their_own_model_path(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text((ROOT / "examples" / "tiny.yaml").read_text())
    assert up._target_path(config, tmp_path / "w") == (tmp_path.parent / ".draftflow"
                                                        / "tiny-target").resolve()
    real = ROOT / "examples" / "llama-3.1-8b.yaml"
    absolute = load_run_config(real).target.model_path
    assert absolute.startswith("/")
    assert up._target_path(real, tmp_path / "w") == Path(absolute)


def test_missing_mooncake_is_reported_before_the_target_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def missing() -> str:
        raise FileNotFoundError("mooncake_master not found")

    def never(*_: object) -> Path:
        raise AssertionError("the target was built before the pre-flight check")

    monkeypatch.setattr(up, "master_binary", missing)
    monkeypatch.setattr(up, "_prepare_target", never)
    assert up.run(up.UpOptions(workdir=tmp_path / "w")) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "Mooncake is missing (mooncake_master not found)" in out
    assert "pip install 'draftflow[mooncake]'" in out


def test_no_free_port_is_reported_before_the_target_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def no_ports(*_: object) -> list[int]:
        raise OSError(99, "Cannot assign requested address")

    monkeypatch.setattr(up, "free_ports", no_ports)
    monkeypatch.setattr(up, "_prepare_target", lambda *_: pytest.fail("built the target"))
    assert up.run(up.UpOptions(workdir=tmp_path / "w")) == 1
    assert "cannot bind a free TCP port on 127.0.0.1" in capsys.readouterr().out

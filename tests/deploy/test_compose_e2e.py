"""``docker-compose up`` on a real engine, as a new user runs it: no .env to write, no profile,
no token. The stack trains examples/tiny.yaml on CPU to COMPLETED; grpcurl on the host, with the
token the stack generated, sees exact accounting; the export is readable by another user.

Needs a Docker engine (started here when the daemon is installed but not running) and the
images: ``DRAFTFLOW_E2E_BUILD``, when set, is a shell command that builds them (CI sets it
where no registry is reachable); otherwise ``docker-compose build`` does. Under ``CI=true`` a
missing engine fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from trainer.strategies.eagle3.export import EXPORTED_NAMES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "dfe2e"
GRPCURL = str(Path(sys.executable).parent / "grpcurl")
STATUS_RPC = "draftflow.v1.CoordinatorService/GetRunStatus"
# README: the command that prints the generated token.
TOKEN_COMMAND = ["exec", "-T", "coordinator", "cat", "/run/draftflow/token"]
CPU_STACK = {"token", "postgres", "coordinator", "mooncake-master", "tiny-target", "run-create",
             "producer-cpu", "trainer-cpu"}
HOST_PORTS = (50051, 50052, 50053, 50061, 8080, 9003, 9101, 9102, 9103)
UP_TIMEOUT_S = 1200  # `up -d` waits for the tiny target (about a minute alone on 2 cores)
TRAIN_TIMEOUT_S = 900


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: the compose end-to-end test must run)")
    pytest.skip(why)


def _engine_running() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A running Docker engine: the one there is, or ``dockerd`` started for this module."""
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} is not installed (scripts/setup.sh --test installs "
                         "docker.io and docker-compose)")
    daemon = None
    if not _engine_running():
        dockerd = shutil.which("dockerd")
        if dockerd is None or os.geteuid() != 0:
            _unavailable("the Docker daemon is not running and cannot be started here "
                         "(needs root and dockerd)")
        log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        with open(log, "wb") as out:
            daemon = subprocess.Popen([dockerd], stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + 120
        while not _engine_running():
            if daemon.poll() is not None or time.monotonic() > deadline:
                daemon.kill()
                _unavailable(f"dockerd did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield
    if daemon is not None:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()


def _env() -> dict[str, str]:
    """The user's shell on a fresh clone: none of the stack's variables set."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("DRAFTFLOW_", "COMPOSE_", "POSTGRES_"))}


def compose(*args: str, timeout: float = 300, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker-compose", "-p", PROJECT, *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"docker-compose {' '.join(args)}:\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def images(engine: None) -> None:
    build = os.environ.get("DRAFTFLOW_E2E_BUILD")
    started = time.monotonic()
    if build:
        done = subprocess.run(["bash", "-c", build], cwd=ROOT, capture_output=True, text=True,
                              timeout=1500)
    else:
        done = subprocess.run(["docker-compose", "build", "coordinator"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"building the images failed:\n{done.stdout[-3000:]}" \
                                 f"\n{done.stderr[-3000:]}"
    print(f"images ready in {time.monotonic() - started:.0f} s")


def _container(service: str) -> str:
    return compose("ps", "-q", service).stdout.strip()


def _state(container: str) -> tuple[str, int, int]:
    out = subprocess.run(["docker", "inspect", "-f",
                          "{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}", container],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.fixture(scope="module")
def stack(images: None) -> Iterator[float]:
    """The default stack, up until its trainer exits; yields how long that took."""
    busy = []
    for port in HOST_PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    assert not busy, f"host ports {busy} are taken; stop what listens there (another stack?)"
    compose("down", "-v", "--remove-orphans", timeout=300, check=False)
    started = time.monotonic()
    try:
        compose("up", "-d", timeout=UP_TIMEOUT_S)
        trainer = _container("trainer-cpu")
        assert trainer, "trainer-cpu was not created"
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        while True:
            status, code, restarts = _state(trainer)
            # restart: on-failure brings a crashed trainer back; here any crash is a failure.
            assert restarts == 0, f"the trainer crashed (exit {code}) and was restarted"
            if status == "exited":
                break
            assert time.monotonic() < deadline, "the trainer did not finish in time"
            time.sleep(5)
        assert code == 0, f"the trainer exited with {code}"
        yield time.monotonic() - started
    except BaseException:
        print(compose("logs", "--no-color", "--tail", "60", timeout=120, check=False).stdout)
        raise
    finally:
        compose("down", "-v", "--remove-orphans", timeout=300, check=False)


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True,
                          timeout=60)


def test_default_stack_trains_the_tiny_run_to_an_export(stack: float) -> None:
    print(f"docker-compose up to the trainer's exit: {stack:.0f} s")
    # The default is the CPU stack, and only that.
    listed = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
         "--format", '{{.Label "com.docker.compose.service"}}'],
        capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert set(listed) == CPU_STACK

    # The token was generated; without it the coordinator refuses, with it grpcurl reads.
    token = compose(*TOKEN_COMMAND).stdout.strip()
    assert len(token) == 32
    request = json.dumps({"run_id": "tiny"})
    refused = _grpcurl("-d", request, "127.0.0.1:50051", STATUS_RPC)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused.stderr
    answer = _grpcurl("-H", f"authorization: Bearer {token}", "-d", request, "127.0.0.1:50051",
                      STATUS_RPC)
    assert answer.returncode == 0, answer.stderr
    status = json.loads(answer.stdout)["status"]

    # Exact accounting: every prompt captured once per epoch, every whole step trained once.
    cfg = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    run = json.loads(_grpcurl(
        "-H", f"authorization: Bearer {token}", "-d", request, "127.0.0.1:50051",
        "draftflow.v1.CoordinatorService/GetRun").stdout)["run"]
    samples = int(run["num_prompts"]) * cfg["epochs"]
    step = cfg["step"]
    per_step = step["world_size"] * step["micro_batch"] * step["accumulation"]
    final = samples // per_step
    assert status["state"] == "RUN_STATE_COMPLETED", status
    assert int(status["last_committed_step"]) == final
    assert int(status["last_checkpoint_step"]) == final
    assert {k: int(v) for k, v in status["prompts"].items() if int(v)} == {"CAPTURED": samples}
    states = {k: int(v) for k, v in status["samples"].items() if int(v)}
    assert set(states) <= {"TRAINED", "RETIRED", "DROPPED"}, states
    assert states.get("TRAINED", 0) + states.get("RETIRED", 0) == final * per_step, states
    assert states.get("DROPPED", 0) == samples - final * per_step, states
    steps = compose("exec", "-T", "postgres", "psql", "-U", "draftflow", "-d", "draftflow",
                    "-tAc", "SELECT count(*), min(size), max(size), count(committed_at) "
                    "FROM steps WHERE run_id = 'tiny'").stdout.strip()
    assert steps == f"{final}|{per_step}|{per_step}|{final}"
    # The workers read the target where run-create recorded it, relative to the config file.
    assert run["config"]["target"]["model_path"] == "/app/.draftflow/tiny-target"

    # The export: SGLang's files, readable by a user other than the trainer's.
    script = (
        "import json, os, stat, sys; from safetensors import safe_open; d = '/checkpoints/final';"
        "print(json.dumps({'modes': {f: oct(stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode))"
        " for f in os.listdir(d)}, 'config': json.load(open(os.path.join(d, 'config.json'))),"
        " 'names': sorted(safe_open(os.path.join(d, 'model.safetensors'), 'pt').keys())}))")
    image = os.environ.get("DRAFTFLOW_IMAGE_CPU", "draftflow:cpu")
    seen = subprocess.run(["docker", "run", "--rm", "--user", "4242:4242", "-v",
                           f"{PROJECT}_checkpoints:/checkpoints:ro", image, "python", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert seen.returncode == 0, seen.stderr
    export = json.loads(seen.stdout)
    assert set(export["modes"].values()) == {"0o644"}, export["modes"]
    assert export["config"]["architectures"] == ["LlamaForCausalLMEagle3"]
    assert export["names"] == sorted(EXPORTED_NAMES)

    # Logs stay readable: no periodic metrics line from the Mooncake master.
    master_log = compose("logs", "--no-color", "mooncake-master").stdout
    assert "Master Admin Metrics" not in master_log

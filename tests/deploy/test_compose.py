"""compose.yaml, the Dockerfiles and the example configs, checked without a container engine.

``docker-compose config`` (Debian's docker-compose) interpolates and validates the file against the
Compose schema; the tests then read the resolved file for the properties the deployment relies on.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from draftflow.run_cli import run_model_path
from services.config import load_run_config
from services.store.factory import mooncake_config
from services.store.mooncake_proc import free_ports

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOTENV = ROOT / ".env"
DOCS = ROOT / "docs" / "multinode.md"
PROFILES = (None, "cpu", "gpu")
GPU_SERVICES = {"producer", "trainer"}
CPU_SERVICES = {"producer-cpu", "trainer-cpu"}
BASE_SERVICES = {"token", "postgres", "coordinator", "mooncake-master", "tiny-target",
                 "run-create"}
ONE_SHOTS = {"token", "tiny-target", "run-create"}
TOKEN_FILE = "/run/draftflow/token"
# Variables that change what the tests check; cleared so the file's defaults are what is tested.
_VARS = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)")


def _compose_bin() -> str:
    found = shutil.which("docker-compose")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("docker-compose is missing: run scripts/setup.sh --test "
                    "(or apt-get install docker-compose)")
    pytest.skip("docker-compose is not installed (scripts/setup.sh --test installs it)")


def _compose_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("DRAFTFLOW_") or k.startswith("POSTGRES_")
                   or k.startswith("COMPOSE_"))}
    env.update(extra)
    return env


def _run_config(profile: str | None, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    args = [_compose_bin(), "-f", str(COMPOSE)]
    if profile:
        args += ["--profile", profile]
    return subprocess.run([*args, "config"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def resolved(profile: str | None = None, **env: str) -> dict[str, Any]:
    """The compose file as docker-compose resolves it, for the services ``profile`` starts."""
    return copy.deepcopy(_resolved(profile, tuple(sorted(env.items()))))


@functools.cache
def _resolved(profile: str | None, env: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    done = _run_config(profile, _compose_env(**dict(env)))
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    config = yaml.safe_load(done.stdout)
    active = {profile} if profile else active_profiles(dict(env))
    config["services"] = {
        name: svc for name, svc in config["services"].items()
        if not svc.get("profiles") or active & set(svc["profiles"])
    }
    return config


def active_profiles(env: dict[str, str]) -> set[str]:
    """Profiles compose enables without --profile: COMPOSE_PROFILES from the environment, else
    from the .env file beside compose.yaml."""
    if env.get("COMPOSE_PROFILES"):
        return set(env["COMPOSE_PROFILES"].split(","))
    dotenv = dict(line.split("=", 1) for line in DOTENV.read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    return set(dotenv.get("COMPOSE_PROFILES", "").split(",")) - {""}


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) for each published port, short or long syntax."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        out.append((host_ip, int(parts[-2]), int(parts[-1])))
    return out


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# --- the file resolves, per profile -------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p or "default")
def test_config_validates_for_each_profile(profile: str | None) -> None:
    services = set(resolved(profile)["services"])
    # Plain `docker compose up` is the CPU stack; the GPU profile replaces its roles.
    expected = BASE_SERVICES | {"gpu": GPU_SERVICES}.get(profile or "", CPU_SERVICES)
    assert services == expected


def test_compose_profiles_in_the_environment_switches_to_gpu() -> None:
    assert set(resolved(None, COMPOSE_PROFILES="gpu")["services"]) == BASE_SERVICES | GPU_SERVICES


def test_no_token_is_needed_and_a_given_one_reaches_the_token_service() -> None:
    services = resolved(None)["services"]
    assert services["token"]["environment"]["DRAFTFLOW_TOKEN"] == ""
    assert resolved(None, DRAFTFLOW_TOKEN="mine")["services"]["token"]["environment"] == {
        "DRAFTFLOW_TOKEN": "mine"}
    command = services["token"]["command"]
    assert command == ["python", "-m", "draftflow.token_file", TOKEN_FILE]
    assert ("token", str(Path(TOKEN_FILE).parent)) in [
        _mount(m) for m in services["token"]["volumes"]]
    deps = services["coordinator"]["depends_on"]
    assert deps["token"]["condition"] == "service_completed_successfully"


# --- network exposure ---------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_published_ports_bind_loopback_by_default(profile: str) -> None:
    ports = [p for svc in resolved(profile)["services"].values() for p in published(svc)]
    assert ports, "expected published ports"
    assert {ip for ip, _, _ in ports} == {"127.0.0.1"}


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_no_host_port_is_published_twice(profile: str) -> None:
    host_ports = [port for svc in resolved(profile)["services"].values()
                  for _, port, _ in published(svc)]
    assert len(host_ports) == len(set(host_ports))


def test_bind_addresses_move_coordinator_and_mooncake_separately() -> None:
    services = resolved("gpu", DRAFTFLOW_BIND="10.1.2.3",
                        DRAFTFLOW_MOONCAKE_BIND="192.168.7.7")["services"]
    coordinator = {port: ip for ip, port, _ in published(services["coordinator"])}
    assert coordinator == {50051: "10.1.2.3", 9101: "10.1.2.3"}
    master = {port: ip for ip, port, _ in published(services["mooncake-master"])}
    # Mooncake has no authentication: its data-plane ports follow only the private address.
    assert master == {50061: "192.168.7.7", 8080: "192.168.7.7", 9003: "10.1.2.3"}


def test_design_ports_are_the_ones_published() -> None:
    services = resolved("gpu")["services"]
    assert {p for _, p, _ in published(services["coordinator"])} == {50051, 9101}
    assert {p for _, p, _ in published(services["producer"])} == {50052, 9102}
    assert {p for _, p, _ in published(services["trainer"])} == {50053, 9103}
    assert {p for _, p, _ in published(services["mooncake-master"])} == {50061, 8080, 9003}
    assert all(host == target for svc in services.values() for _, host, target in published(svc))


def test_postgres_is_not_published() -> None:
    assert not resolved("cpu")["services"]["postgres"].get("ports")


# --- healthchecks and start order ---------------------------------------------------------------


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_every_long_running_service_has_a_healthcheck(profile: str) -> None:
    services = resolved(profile)["services"]
    for name, svc in services.items():
        if name in ONE_SHOTS:
            assert svc["restart"] == "no", name
            continue
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_grpc_roles_probe_their_own_listen_port(profile: str) -> None:
    services = resolved(profile)["services"]
    roles = {n: s for n, s in services.items() if "--listen" in s.get("command", [])}
    assert set(roles) == {"coordinator"} | (CPU_SERVICES if profile == "cpu" else GPU_SERVICES)
    for name, svc in roles.items():
        port = _flag(svc["command"], "--listen").rsplit(":", 1)[1]
        probe = ["CMD", "draftflow", "health", f"127.0.0.1:{port}"]
        assert svc["healthcheck"]["test"] == probe, name


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_healthcheck_timeouts_leave_headroom(profile: str) -> None:
    for name, svc in resolved(profile)["services"].items():
        check = svc.get("healthcheck")
        if check and check["test"][:2] == ["CMD", "draftflow"]:
            # `draftflow health` takes well under a second; a busy 2-core box may take several.
            assert _seconds(check["timeout"]) >= 10, name


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert match and duration, duration
    return int(match.group(1) or 0) * 60 + float(match.group(2) or 0)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_workers_start_after_the_run_exists(profile: str) -> None:
    services = resolved(profile)["services"]
    for name in CPU_SERVICES if profile == "cpu" else GPU_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["coordinator"]["condition"] == "service_healthy"
        assert deps["mooncake-master"]["condition"] == "service_healthy"
        assert deps["run-create"]["condition"] == "service_completed_successfully"
    assert services["coordinator"]["depends_on"]["postgres"]["condition"] == "service_healthy"


# --- GPU reservations, volumes, environment -----------------------------------------------------


def test_gpu_roles_reserve_nvidia_devices_and_nothing_else_does() -> None:
    services = resolved("gpu")["services"]
    gpu_ids = {}
    for name, svc in services.items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if name not in GPU_SERVICES:
            assert not devices, f"{name} should not reserve devices"
            continue
        assert len(devices) == 1
        assert devices[0]["driver"] == "nvidia"
        assert devices[0]["capabilities"] == ["gpu"]
        gpu_ids[name] = devices[0]["device_ids"]
    assert gpu_ids == {"producer": ["0"], "trainer": ["1"]}
    assert resolved("gpu", DRAFTFLOW_TRAINER_GPU="0")["services"]["trainer"]["deploy"][
        "resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]


def test_cpu_roles_reserve_no_devices() -> None:
    for name, svc in resolved("cpu")["services"].items():
        assert "deploy" not in svc, name


def test_database_and_checkpoints_live_in_named_volumes() -> None:
    config = resolved("gpu")
    assert {"pgdata", "checkpoints"} <= set(config["volumes"])
    pg_mounts = config["services"]["postgres"]["volumes"]
    assert any(_mount(m) == ("pgdata", "/var/lib/postgresql/data") for m in pg_mounts)
    for name in ("trainer",):
        assert any(_mount(m) == ("checkpoints", "/checkpoints")
                   for m in config["services"][name]["volumes"])
        assert _flag(config["services"][name]["command"], "--out") == "/checkpoints"


def _mount(m: Any) -> tuple[str, str]:
    if isinstance(m, dict):
        return str(m["source"]), str(m["target"])
    source, target = str(m).split(":")[:2]
    return source, target


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_roles_share_one_token_and_coordinator(profile: str) -> None:
    services = resolved(profile, DRAFTFLOW_TOKEN="abc123")["services"]
    users = {n: s for n, s in services.items()
             if n not in ("postgres", "mooncake-master", "tiny-target", "token")}
    assert users
    for name, svc in users.items():
        env = svc["environment"]
        # The token reaches the roles only through the token service's file.
        assert "DRAFTFLOW_TOKEN" not in env, name
        assert env["DRAFTFLOW_TOKEN_FILE"] == TOKEN_FILE, name
        assert ("token", str(Path(TOKEN_FILE).parent)) in [_mount(m) for m in svc["volumes"]]
        assert env["DRAFTFLOW_COORDINATOR"] == "coordinator:50051", name
        assert env["DRAFTFLOW_RUN"] == "tiny", name


def test_cpu_roles_split_the_cores_between_them() -> None:
    services = resolved("cpu")["services"]
    for name in CPU_SERVICES:
        assert services[name]["environment"]["DRAFTFLOW_CPU_PROCESSES"] == str(len(CPU_SERVICES))
    for name in BASE_SERVICES:
        assert "DRAFTFLOW_CPU_PROCESSES" not in (services[name].get("environment") or {}), name


def test_coordinator_database_url_matches_the_postgres_service() -> None:
    services = resolved(None, POSTGRES_PASSWORD="pw")["services"]
    pg = services["postgres"]["environment"]
    url = services["coordinator"]["environment"]["DRAFTFLOW_DB"]
    assert url == (f"postgresql+psycopg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
                   f"@postgres:5432/{pg['POSTGRES_DB']}")
    assert pg["POSTGRES_PASSWORD"] == "pw"


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_store_url_names_the_master_and_each_workers_own_host(profile: str) -> None:
    services = resolved(profile)["services"]
    rpc_port = _flag_eq(services["mooncake-master"]["command"], "--rpc_port")
    for name in CPU_SERVICES if profile == "cpu" else GPU_SERVICES:
        svc = services[name]
        url = svc["environment"]["DRAFTFLOW_STORE"]
        base = (f"mooncake://mooncake-master:{rpc_port}?local={svc['hostname']}"
                "&metadata=P2PHANDSHAKE")
        if name.startswith("producer"):
            # Nothing else lends the pool memory: without a segment every write waits forever.
            default_mb = 1024 if profile == "cpu" else 16384
            assert url == f"{base}&segment_mb={default_mb}"
            assert mooncake_config(url).segment_mb == default_mb
        else:
            assert url == base


def test_producer_segment_size_is_a_setting() -> None:
    services = resolved("gpu", DRAFTFLOW_PRODUCER_SEGMENT_MB="4096")["services"]
    assert services["producer"]["environment"]["DRAFTFLOW_STORE"].endswith("&segment_mb=4096")


def _flag_eq(command: list[str], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in command if arg.startswith(name + "="))


def test_every_variable_is_documented() -> None:
    text = COMPOSE.read_text()
    names = set(_VARS.findall(text))
    for svc in yaml.safe_load(text)["services"].values():
        env = svc.get("environment") or {}
        names |= set(env) if isinstance(env, dict) else {e.split("=")[0] for e in env}
    docs = DOCS.read_text()
    missing = sorted(n for n in names if f"`{n}`" not in docs)
    assert not missing, f"document these in {DOCS.relative_to(ROOT)}: {missing}"
    assert {"DRAFTFLOW_TOKEN", "DRAFTFLOW_STORE", "DRAFTFLOW_DB", "DRAFTFLOW_RUN",
            "DRAFTFLOW_COORDINATOR"} <= names


# --- run configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_validates(path: Path) -> None:
    cfg = load_run_config(path)
    step = cfg.step
    assert step.world_size * step.micro_batch * step.accumulation >= 1
    assert cfg.dataset_path(path).is_file(), f"{cfg.dataset} is not in the repository"


def test_expected_examples_exist() -> None:
    names = {p.name for p in (ROOT / "examples").glob("*.yaml")}
    assert {"tiny.yaml", "llama-3.1-8b.yaml", "qwen3-8b.yaml"} <= names


def test_real_targets_load_from_the_models_mount() -> None:
    mounts = [_mount(m) for m in resolved("gpu")["services"]["producer"]["volumes"]]
    model_root = next(target for _, target in mounts if target == "/models")
    for name in ("llama-3.1-8b.yaml", "qwen3-8b.yaml"):
        cfg = load_run_config(ROOT / "examples" / name)
        assert cfg.target.model_path.startswith(model_root + "/"), name


def test_tiny_target_service_builds_the_model_tiny_yaml_names(tmp_path: Path) -> None:
    services = resolved("cpu")["services"]
    command = services["tiny-target"]["command"]
    assert command[:2] == ["python", "-c"]
    built_at = re.findall(r"'(/app/[^']+)'", command[2])
    assert len(built_at) == 1
    # The image holds the repository at /app: resolve tiny.yaml's model path as it would there.
    cfg = load_run_config(ROOT / "examples/tiny.yaml")
    in_image = Path(os.path.normpath(Path("/app/examples") / cfg.target.model_path))
    assert in_image == Path(built_at[0])
    assert any(_mount(m)[1] == "/app/.draftflow" for m in services["tiny-target"]["volumes"])
    for name in ("run-create", *CPU_SERVICES):
        assert ("workdir", "/app/.draftflow") in [_mount(m) for m in services[name]["volumes"]]
    # The workers' side: run-create (working directory /app) records the path relative to the
    # config file, which is where the workers' volume holds the target.
    assert services["run-create"]["command"][-1] == "examples/tiny.yaml"
    recorded = run_model_path("/app/examples/tiny.yaml", cfg.target.model_path)
    assert recorded == built_at[0]
    for name in CPU_SERVICES:
        mounts = [_mount(m) for m in services[name]["volumes"]]
        assert any(recorded.startswith(target + "/") for _, target in mounts), name
    # The same command, aimed at a temporary directory, builds a loadable model directory.
    script = command[2].replace(built_at[0], str(tmp_path / "tiny-target"))
    env = {**os.environ, **services["tiny-target"].get("environment", {})}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, timeout=600,
                   capture_output=True)
    assert (tmp_path / "tiny-target" / "config.json").is_file()
    assert (tmp_path / "tiny-target" / "tokenizer.json").is_file()


def test_compose_default_config_matches_the_default_run() -> None:
    services = resolved(None)["services"]
    config_arg = services["run-create"]["command"][-1]
    cfg = load_run_config(ROOT / config_arg)
    assert cfg.run_id == services["coordinator"]["environment"]["DRAFTFLOW_RUN"]


# --- images -------------------------------------------------------------------------------------


def _extras_in(dockerfile: Path) -> set[str]:
    found = re.findall(r'"\.\[([a-z0-9,-]+)\]"', dockerfile.read_text())
    assert found, f"{dockerfile.name} installs no project extras"
    return {e for group in found for e in group.split(",")}


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_built_dockerfiles_exist_and_install_declared_extras(profile: str) -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"])
    for svc in resolved(profile)["services"].values():
        if "build" not in svc:
            continue
        dockerfile = ROOT / svc["build"]["dockerfile"]
        assert dockerfile.is_file()
        assert _extras_in(dockerfile) <= extras


def test_cuda_image_carries_the_gpu_extras() -> None:
    assert {"mooncake-cuda", "sglang", "postgres"} <= _extras_in(ROOT / "docker/Dockerfile.cuda")
    assert {"mooncake", "postgres"} <= _extras_in(ROOT / "docker/Dockerfile.cpu")


def test_build_context_leaves_out_local_state() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".draftflow", "models", ".env"} <= ignored


# --- the Mooncake master command, run for real ---------------------------------------------------


def _mooncake_master() -> str:
    found = Path(sys.executable).parent / "mooncake_master"
    assert found.exists(), "mooncake_master is missing: run scripts/setup.sh --test"
    return str(found)


def test_mooncake_master_command_and_healthcheck_work() -> None:
    svc = resolved(None)["services"]["mooncake-master"]
    command = list(svc["command"])
    assert command[0] == "mooncake_master"
    assert _flag_eq(command, "--rpc_port") == "50061"
    # Same flags, free ports, loopback only.
    flags = ("--rpc_port", "--http_metadata_server_port", "--metrics_port")
    ports = {flag: str(port) for flag, port in zip(flags, free_ports(3), strict=True)}
    args = [arg.split("=")[0] for arg in command[1:]]
    argv = [_mooncake_master(), *[
        f"{flag}={ports[flag]}" if flag in ports else arg
        for flag, arg in zip(args, command[1:], strict=True)
    ], "--rpc_address=127.0.0.1", "--http_metadata_server_host=127.0.0.1",
        "--metrics_host=127.0.0.1"]
    probe = svc["healthcheck"]["test"]
    assert probe[:3] == ["CMD", "python", "-c"]
    script = probe[3].replace("127.0.0.1:9003", f"127.0.0.1:{ports['--metrics_port']}")
    assert script != probe[3]
    master = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 60
        while True:
            check = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                   timeout=30)
            if check.returncode == 0:
                break
            assert master.poll() is None, f"mooncake_master exited: {master.stderr.read()}"
            assert time.monotonic() < deadline, f"master never healthy: {check.stderr}"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['--metrics_port']}/health") as r:
            assert b'"status":"ok"' in r.read()
        # The master would log its metrics every 10 s: past that, the log has none.
        time.sleep(max(0.0, started + 11.0 - time.monotonic()))
    finally:
        master.terminate()
        log = master.communicate(timeout=30)[1]
    assert "Master Admin Metrics" not in log

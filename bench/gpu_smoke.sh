#!/usr/bin/env bash
# GPU smoke run: the whole DraftFlow path on one CUDA machine: steps 1-3 in under eight minutes,
# step 4 (SGLang, where installed) in up to about fourteen more.
#
#   bash bench/gpu_smoke.sh                  run it (any working directory; results in $OUT)
#   bash bench/gpu_smoke.sh --fetch-wheels   on a machine WITH network, before: fill .wheels/
#   DEVICE=cpu bash bench/gpu_smoke.sh --no-install
#                                            rehearse it on a machine set up for development
#
# What it runs, each step under its own time limit:
#   1. installs what the machine lacks from the repository's .wheels/ folder (git-ignored, filled
#      by --fetch-wheels) into a private directory put first on PYTHONPATH; nothing is
#      downloaded and the machine's torch is left alone;
#   2. `draftflow up --device cuda`: coordinator on SQLite, Mooncake master and holder over TCP,
#      an HF producer running the tiny target in bfloat16 on the GPU, the trainer on the GPU;
#      checks the exported draft and prints the summary (accuracy against chance);
#   3. bench/bench_e2e.py --device cuda: the same topology against one process with features
#      handed over in memory (samples/s, data wait, ratio);
#   4. SGLang capture, where SGLang (>= 0.5.23) is importable and draftflow is installed in the
#      same environment (pip install -e '.[sglang]'; not in .wheels/, it is gigabytes):
#      tests/gpu/test_sglang_e2e.py (the plugin's device path; EAGLE3 and DFlash features from
#      SGLang against the hf engine), then `draftflow up --config examples/tiny-dflash.yaml` with
#      DRAFTFLOW_ENGINE=sglang: a DFlash run whose producer captures through SGLang in process
#      (hidden_states of the plan's layers, no final state) and a trainer on the GPU. Skipped,
#      with the reason, where SGLang is missing; SGLANG=require makes that a failure, SGLANG=skip
#      leaves the step out.
#
# The machine needs: Python 3.12 (or the python3 on PATH, $PYTHON overrides) with a CUDA torch,
# grpcio, protobuf, transformers, safetensors, tokenizers, xxhash, pyyaml, rich and
# prometheus-client. .wheels/ brings sqlalchemy, alembic (+ Mako, MarkupSafe), pydantic
# (+ pydantic-core, annotated-types, typing-inspection), grpcio-health-checking,
# grpcio-reflection, grpcio and protobuf at the versions the generated code needs, and the
# non-CUDA Mooncake build (about 59 MiB in all; the CUDA build alone is 98 MiB, and the TCP
# transport used here does not need it).
#
# Outputs (in $OUT, default .gpu-smoke/ in the repository): env.txt, up.txt, summary.json,
# bench_e2e.txt, logs/ (every role's log from step 2), and from step 4 sglang_e2e.txt,
# up_dflash_sglang.txt, summary_dflash_sglang.json, logs_dflash_sglang/. Exit status 0 only if
# every step that ran passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="$ROOT/.wheels"
PACKAGES=(
  "mooncake-transfer-engine-non-cuda>=0.3.6" "sqlalchemy>=2.0.30" "alembic>=1.13"
  "pydantic>=2.7" "grpcio-health-checking>=1.70" "grpcio-reflection>=1.70"
)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
  # Mooncake's aiohttp/requests/msgpack serve its HTTP metadata server and CLI, which
  # DraftFlow does not use; leaving them out keeps the folder under 60 MiB.
  (cd "$WHEELS" && rm -f aiohappyeyeballs-* aiohttp-* aiosignal-* attrs-* certifi-* \
    charset_normalizer-* frozenlist-* idna-* msgpack-* multidict-* propcache-* requests-* \
    urllib3-* yarl-*)
  du -sh "$WHEELS"
  exit 0
fi

INSTALL=1
[[ "${1:-}" == "--no-install" ]] && INSTALL=0
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-$ROOT/.gpu-smoke}"
mkdir -p "$OUT"
SITE="${TMPDIR:-/tmp}/draftflow-gpu-site"
START=$SECONDS
step() { echo; echo "== [$((SECONDS - START)) s] $*"; }

step "environment" | tee "$OUT/env.txt"
{
  nvidia-smi -L || true
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
} 2>&1 | tee -a "$OUT/env.txt"
if [[ "$DEVICE" == cuda* ]]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
fi

if [[ $INSTALL -eq 1 ]]; then
  step "installing from .wheels/ into $SITE"
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $WHEELS: run 'bash bench/gpu_smoke.sh --fetch-wheels' where there is" \
      "network"
    exit 2
  fi
  rm -rf "$SITE"
  # --no-deps: exactly the fetched set; the machine's own torch and transformers stay in charge.
  timeout 120 "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  # Mooncake links a few system libraries (libibverbs, libnuma, libcurl) that images usually
  # have; name any that are missing rather than fail later with an import error.
  if missing=$(ldd "$SITE"/mooncake/store.so | grep "not found"); then
    echo "Mooncake needs system libraries this machine lacks:"
    echo "$missing"
    echo "install them (Debian/Ubuntu: libibverbs1 libnuma1 libcurl4) and run again"
    exit 3
  fi
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import sqlalchemy, alembic, pydantic, grpc, grpc_health.v1, grpc_reflection.v1alpha
from mooncake.store import MooncakeDistributedStore
from services.store.mooncake_proc import master_binary
print("imports ok; grpc", grpc.__version__, "sqlalchemy", sqlalchemy.__version__,
      "mooncake_master", master_binary())' | tee -a "$OUT/env.txt"

step "draftflow up --device $DEVICE (on CUDA: tiny target in bfloat16, trainer on the GPU)"
WORK="$OUT/up"
set +e
timeout 240 "$PY" -m draftflow up --device "$DEVICE" --workdir "$WORK" --fresh --timeout 220 \
  2>&1 | tee "$OUT/up.txt"
UP=${PIPESTATUS[0]}
set -e
cp -r "$WORK/logs" "$OUT/logs" 2>/dev/null || true
cp "$WORK"/runs/*/summary.json "$OUT/summary.json" 2>/dev/null || true
if [[ $UP -ne 0 ]]; then
  echo "draftflow up failed with status $UP; see $OUT/logs"
  exit 1
fi
"$PY" - "$WORK" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path
work, device = Path(sys.argv[1]), sys.argv[2]
(run,) = (work / "runs").iterdir()
summary = json.loads((run / "summary.json").read_text())
final = run / "final"
assert (final / "config.json").is_file() and any(final.glob("*.safetensors")), final
assert summary["samples"].get("LOST", 0) == 0 and summary["samples"].get("DEAD", 0) == 0
acc = summary["trainer"]["accuracies"]
assert acc and acc[0] > 5 * summary["chance_accuracy"], summary
assert summary["trainer"]["device"].startswith(device), summary["trainer"]
print(f"ok: {summary['steps']} steps, top-1 {acc}, chance {summary['chance_accuracy']:.4f}, "
      f"trainer {summary['trainer']['samples_per_second']:.1f} samples/s on "
      f"{summary['trainer']['device']}, {summary['seconds']:.0f} s")
EOF

step "bench/bench_e2e.py --device $DEVICE"
timeout 240 "$PY" bench/bench_e2e.py --device "$DEVICE" 2>&1 | tee "$OUT/bench_e2e.txt"

SGLANG="${SGLANG:-auto}"
sglang_missing() {
  "$PY" - <<'EOF'
import importlib.metadata, importlib.util, sys
if importlib.util.find_spec("sglang") is None:
    sys.exit("SGLang is not installed (pip install -e '.[sglang]')")
if not any(ep.value == "producer.sglang_plugin:register"
           for ep in importlib.metadata.entry_points(group="sglang.srt.plugins")):
    sys.exit("draftflow is not installed where SGLang runs (pip install -e .), so SGLang would "
             "not load the capture plugin")
EOF
}
if [[ "$SGLANG" == "skip" ]]; then
  step "SGLang capture: left out (SGLANG=skip)"
elif ! why=$(sglang_missing 2>&1); then
  step "SGLang capture: skipped: $why"
  if [[ "$SGLANG" == "require" ]]; then
    echo "SGLANG=require: failing"
    exit 4
  fi
else
  step "tests/gpu/test_sglang_e2e.py (SGLang against the hf engine: EAGLE3 and DFlash)"
  timeout 420 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu/test_sglang_e2e.py \
    2>&1 | tee "$OUT/sglang_e2e.txt"

  step "DRAFTFLOW_ENGINE=sglang draftflow up --config examples/tiny-dflash.yaml --device $DEVICE"
  WORK_DF="$OUT/up-dflash-sglang"
  set +e
  DRAFTFLOW_ENGINE=sglang timeout 420 "$PY" -m draftflow up \
    --config "$ROOT/examples/tiny-dflash.yaml" --device "$DEVICE" --workdir "$WORK_DF" --fresh \
    --timeout 400 2>&1 | tee "$OUT/up_dflash_sglang.txt"
  UP_DF=${PIPESTATUS[0]}
  set -e
  cp -r "$WORK_DF/logs" "$OUT/logs_dflash_sglang" 2>/dev/null || true
  cp "$WORK_DF"/runs/*/summary.json "$OUT/summary_dflash_sglang.json" 2>/dev/null || true
  if [[ $UP_DF -ne 0 ]]; then
    echo "the DFlash run through SGLang failed with status $UP_DF; see $OUT/logs_dflash_sglang"
    exit 1
  fi
  "$PY" - "$WORK_DF" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path
work, device = Path(sys.argv[1]), sys.argv[2]
(run,) = (work / "runs").iterdir()
summary = json.loads((run / "summary.json").read_text())
final = run / "final"
assert summary["algorithm"] == "dflash", summary["algorithm"]
assert (final / "config.json").is_file() and any(final.glob("*.safetensors")), final
assert summary["samples"].get("LOST", 0) == 0 and summary["samples"].get("DEAD", 0) == 0
assert summary["steps"] > 0 and summary["trainer"]["device"].startswith(device), summary
# Every producer captured through SGLang with the DFlash layout: the plan's layers as
# hidden_states, no final state.
ready = []
for log in sorted((work / "logs").glob("producer*.log")):
    for line in log.read_text().splitlines():
        if '"engine_ready"' in line:
            ready.append(json.loads(line))
assert ready, "no producer logged engine_ready"
for rec in ready:
    assert rec.get("engine") == "sglang", rec
    assert rec.get("layers_tensor") == "hidden_states" and rec.get("final_hidden") is False, rec
acc = summary["trainer"]["accuracies"]
print(f"ok: DFlash through SGLang, layers {ready[0].get('aux_layer_ids')}, "
      f"{summary['steps']} steps, top-1 per block position {acc}, "
      f"acceptance {summary['trainer']['acceptance_length']:.2f}, {summary['seconds']:.0f} s")
EOF
fi

step "done in $((SECONDS - START)) s; results in $OUT"

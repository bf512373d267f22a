#!/usr/bin/env bash
# Create .venv and install DraftFlow with what its tests need.
#   scripts/setup.sh          the product (draftflow up)
#   scripts/setup.sh --test   plus test tools, PostgreSQL driver, grpcurl, and a Docker engine
#                             with docker-compose for the compose end-to-end test
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

need_apt=()
# Mooncake's transfer engine links libibverbs even when only TCP is used.
for lib in libibverbs.so.1:libibverbs1 libnuma.so.1:libnuma1 libcurl.so.4:libcurl4; do
  ldconfig -p | grep -q "${lib%%:*} " || need_apt+=("${lib#*:}")
done
if [ $want_test = 1 ]; then
  # The engine: a local dockerd (the test starts it when it is not running), or any engine
  # the docker client already reaches.
  command -v dockerd >/dev/null || docker info >/dev/null 2>&1 || need_apt+=(docker.io)
  command -v docker-compose >/dev/null || need_apt+=(docker-compose)
  command -v ip >/dev/null || need_apt+=(iproute2)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing system packages: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "missing system packages: ${need_apt[*]}; run: sudo apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
fi

stamp="$VENV/.draftflow-installed"
extras="mooncake,postgres,tensorboard"
[ $want_test = 1 ] && extras="test"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! grep -qx "$extras" "$stamp"; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[$extras]"
  echo "$extras" > "$stamp"
fi
if [ $want_test = 1 ] && [ ! -d .cache/sglang-src/sglang ]; then
  # SGLang's own source (not installed: it needs CUDA) pins the capture plugin's fakes to it.
  echo "fetching SGLang 0.5.23's source for the plugin tests"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps sglang==0.5.23 -d .cache/wheels
  "$VENV/bin/python" - <<'PY'
import glob, zipfile
wheel = sorted(glob.glob(".cache/wheels/sglang-0.5.23-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    z.extractall(".cache/sglang-src", [n for n in z.namelist()
                                       if n.startswith("sglang/") and n.endswith(".py")])
PY
fi
echo "ready: $VENV/bin/draftflow"

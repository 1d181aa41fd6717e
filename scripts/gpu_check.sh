#!/usr/bin/env bash
# The GPU check: on a CUDA machine (sglang not needed), the kernel and eviction parity tests, which
# there include the Qwen3-4B/14B shapes and compare the compiled kernels with the torch path, the
# kernel benchmark, and whole eviction rounds (kernel launches and time per round at Qwen3-14B and
# SmolLM2 shapes for 1, 8 and 32 requests; Triton compiles after the startup warm-up); one JSON with
# all three: benchmarks/results/gpu_check.json (or $1).
#   bash scripts/gpu_check.sh [out.json]
# Never part of `make test`: CI has no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu_check.json}"
py="${PYTHON:-python3}"
tmp="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: the GPU check needs one")' || exit 2
"$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_evictor.py tests/test_policies.py \
    --junitxml="$tmp/junit.xml" 2>&1 | tee "$tmp/pytest.log"
tests_rc=${PIPESTATUS[0]}
"$py" benchmarks/bench_kernels.py --out "$tmp/bench_kernels.json" 2>&1 | tee "$tmp/bench.log"
bench_rc=${PIPESTATUS[0]}
"$py" benchmarks/bench_kernels.py --rounds --out "$tmp/eviction_rounds.json" 2>&1 | tee "$tmp/rounds.log"
rounds_rc=${PIPESTATUS[0]}
[ "$rounds_rc" = 0 ] || bench_rc=$rounds_rc
"$py" - "$tmp" "$out" "$tests_rc" "$bench_rc" <<'PY'
import json, os, sys, xml.etree.ElementTree as ET
import torch, triton
tmp, out, tests_rc, bench_rc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rounds_path = os.path.join(tmp, "eviction_rounds.json")
rounds = json.load(open(rounds_path)) if os.path.exists(rounds_path) else None
suite = ET.parse(os.path.join(tmp, "junit.xml")).getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
failures = [f"{c.get('classname')}::{c.get('name')}: {(c.find('failure') if c.find('failure') is not None else c.find('error')).get('message', '')[:300]}"
            for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
bench_path = os.path.join(tmp, "bench_kernels.json")
bench = json.load(open(bench_path)) if os.path.exists(bench_path) else None
report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
          "tests": {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"rc": tests_rc,
                    "failed": failures}, "bench_kernels": bench, "eviction_rounds": rounds, "bench_rc": bench_rc}
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
json.dump(report, open(out, "w"), indent=1)
print(f"[gpu_check] {report['tests']['tests']} tests, {len(failures)} failed; bench rc {bench_rc}; wrote {out}")
sys.exit(1 if tests_rc or bench_rc else 0)
PY

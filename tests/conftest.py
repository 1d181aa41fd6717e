"""Test-session setup shared by every test module."""

import os
import sys
from pathlib import Path

import torch

# The benchmarks are scripts, not a package: tests import them by name (``import fidelity``), as
# the benchmarks import each other (fidelity.py its fidelity_* modules).
BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

if not torch.cuda.is_available():
    # The Triton kernels run under the interpreter on CPU tensors. triton.jit reads the flag when a
    # kernel is defined, so it must be set before any module imports sglang_vase.kernels. Servers
    # started by the tests do not inherit it (sglang_vase.serving): serving uses the torch path.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # ``make test`` runs two pytest-xdist workers, one per core of a 2-core machine. One torch/OMP
    # thread for each worker and each server it starts (they inherit the environment): two busy
    # processes with a thread per core each, not four threads fighting over two cores, which stalls
    # SGLang's CPU decode by 2x or more.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Files that start servers first (they take most of the time), the quick ones after them, so
    that the workers finish together: xdist hands out whole files in this order (--dist loadfile)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within a file is kept

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

"""Test-session setup shared by every test module."""

import os

import torch

if not torch.cuda.is_available():
    # The Triton kernels run under the interpreter on CPU tensors. triton.jit reads the flag when a
    # kernel is defined, so it must be set before any module imports sglang_vase.kernels. Servers
    # started by the tests do not inherit it (sglang_vase.serving): serving uses the torch path.
    os.environ.setdefault("TRITON_INTERPRET", "1")

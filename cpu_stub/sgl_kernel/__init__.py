"""CPU-only stand-in for ``sgl_kernel`` (sglang-kernel), installed by sglang-vase's CPU route.

sglang 0.5.23 imports a few ``sgl_kernel`` symbols at module level even on the CPU engine, and the
PyPI wheel fails to load without libcuda. The torch_native attention backend calls none of them, so
every attribute here is a function that raises only when called.

It must never stand in for the real package: on a machine with CUDA it refuses to import, so a
leftover install fails loudly instead of silently disabling SGLang's kernels.
"""

import torch

if torch.cuda.is_available():
    raise ImportError(
        "sglang-vase's CPU stand-in for sgl_kernel is installed on a machine with CUDA. "
        "Run `pip uninstall sglang-vase-cpu-sgl-kernel` and install the real `sglang-kernel` "
        "(`make install ROUTE=gpu` or `pip install -e '.[gpu]'`)."
    )

IS_CPU_STANDIN = True


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available on the CPU route (sglang-vase stand-in); "
            "use --attention-backend torch_native on CPU or install sglang-kernel on a GPU machine"
        )

    _unavailable.__name__ = name
    return _unavailable

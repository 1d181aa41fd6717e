"""``python -m sglang_vase.launch_server [SGLang flags] [--vase-* flags]``.

Every SGLang flag works as with ``python -m sglang.launch_server``. The ``--vase-*`` flags set the
eviction defaults (requests may override them, see ``sglang_vase.config``). The launcher also:
- serves the embedded SmolLM2-135M model when no ``--model-path`` is given;
- on a machine without CUDA, sets SGLang's CPU route up (device, torch_native attention, no CUDA
  graphs, bounded KV pool and request count) and says so in one log line;
- adds the flags eviction needs (no radix cache, no overlap scheduler, page size 1) and refuses,
  at startup, the flags it cannot honour.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sglang_vase.config import DISABLED, ENV_VAR, VaseParams
from sglang_vase.policies import POLICIES

logger = logging.getLogger("sglang_vase")

# CPU-route sizes: enough for tests and demos on a small machine (SGLang would take ~70% of RAM).
CPU_MAX_TOTAL_TOKENS = "65536"
CPU_MAX_RUNNING_REQUESTS = "64"

# Flags eviction cannot honour: (flag, reason). A flag given with a false-y value is fine.
REFUSED_FLAGS = {
    "--speculative-algorithm": "speculative decoding writes draft KV that eviction would move",
    "--enable-mixed-chunk": "mixed prefill/decode batches compute decode positions from the physical length",
    "--enable-hierarchical-cache": "the hierarchical cache stores rows that eviction compacts",
    "--enable-dp-attention": "DP attention is not supported with eviction yet",
    "--enable-radix-cache": "a compacted row must never enter the radix tree (prefix sharing is not supported yet)",
}


def vase_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_vase.launch_server", add_help=False)
    g = p.add_argument_group("sglang-vase (KV-cache eviction)")
    g.add_argument("--vase-policy", default="vase", choices=sorted(POLICIES) + [DISABLED],
                   help="eviction policy for requests that do not choose one; 'none' = plain SGLang")
    g.add_argument("--vase-budget", type=int, default=VaseParams.budget,
                   help="B: KV slots kept per request, layer and KV head after an eviction")
    g.add_argument("--vase-window", type=int, default=VaseParams.window,
                   help="R: recency window = observation window = eviction period; B > R, B %% R == 0")
    g.add_argument("--vase-n-large", type=int, default=None,
                   help="slots pinned for the largest-magnitude values (default budget // 4)")
    g.add_argument("--vase-seed", type=int, default=None,
                   help="server seed: requests without their own seed derive one from it and their id")
    g.add_argument("--vase-sort-kept", action="store_true",
                   help="store kept tokens in position order (default: [pinned, sampled], as the paper's code)")
    return p


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in argv (``--f v`` or ``--f=v``), '' for a bare flag, None if absent."""
    for i, a in enumerate(argv):
        if a == flag:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            return "" if nxt.startswith("--") else nxt
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _ensure(argv: list[str], flag: str, value: str | None = None) -> bool:
    """Append ``flag [value]`` unless present; True when it was added."""
    if _flag_value(argv, flag) is not None:
        return False
    argv += [flag] if value is None else [flag, value]
    return True


class LaunchError(ValueError):
    """A flag combination sglang-vase refuses; the message says which and why."""


def prepare(argv: list[str], cuda_available: bool | None = None) -> tuple[VaseParams, list[str], dict, list[str]]:
    """Split and check the command line: (eviction defaults, SGLang argv, env to set, log notes)."""
    ns, rest = vase_parser().parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--vase")]
    if unknown:
        raise LaunchError(f"unknown sglang-vase flag(s) {unknown}; see --help")
    params = VaseParams(
        policy=ns.vase_policy, budget=ns.vase_budget, window=ns.vase_window,
        n_large=ns.vase_n_large, seed=ns.vase_seed, sort_kept=ns.vase_sort_kept,
    )
    try:
        params.validate()
    except ValueError as e:
        raise LaunchError(f"invalid --vase-* flags: {e}") from None

    argv, env, notes = list(rest), {ENV_VAR: params.to_json()}, []
    if _flag_value(argv, "--model-path") is None:
        from sglang_vase.models import prepare_default_model

        argv += ["--model-path", prepare_default_model(verbose=True)]
        notes.append("serving the embedded SmolLM2-135M-Instruct (no --model-path given)")

    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        added = [f for f, v in (("--device", "cpu"), ("--attention-backend", "torch_native"),
                                ("--disable-cuda-graph", None), ("--max-total-tokens", CPU_MAX_TOTAL_TOKENS),
                                ("--max-running-requests", CPU_MAX_RUNNING_REQUESTS),
                                # An idle scheduler otherwise spins a whole core the model needs.
                                ("--sleep-on-idle", None)) if _ensure(argv, f, v)]
        notes.append(f"no CUDA device: CPU route (SGLANG_USE_CPU_ENGINE=1{', ' if added else ''}{' '.join(added)})")

    if params.enabled:
        for flag, why in REFUSED_FLAGS.items():
            value = _flag_value(argv, flag)
            if value is not None and value.lower() not in ("false", "0", "none"):
                raise LaunchError(f"{flag} cannot be used with KV eviction: {why} (or pass --vase-policy none)")
        page = _flag_value(argv, "--page-size")
        if page not in (None, "1"):
            raise LaunchError(f"--page-size {page}: token-level eviction needs --page-size 1")
        pp = _flag_value(argv, "--pp-size") or _flag_value(argv, "--pipeline-parallel-size")
        if pp not in (None, "1"):
            raise LaunchError("pipeline parallelism cannot be used with KV eviction yet")
        added = [f for f, v in (("--disable-radix-cache", None), ("--disable-overlap-schedule", None),
                                ("--page-size", "1")) if _ensure(argv, f, v)]
        if added:
            notes.append(f"KV eviction needs {' '.join(added)} (added)")
    return params, argv, env, notes


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        vase_parser().print_help()
        print("\nAll other flags are SGLang's:\n")
        params, sglang_argv, env, notes = None, argv, {}, []
    else:
        try:
            params, sglang_argv, env, notes = prepare(argv)
        except LaunchError as e:
            vase_parser().exit(2, f"error: {e}\n")
    os.environ.update(env)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    for note in notes:
        logger.info("sglang-vase: %s", note)
    if params is not None:
        logger.info("sglang-vase: eviction defaults %s", params)

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(sglang_argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()

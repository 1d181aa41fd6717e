"""``python -m sglang_vase.launch_server [SGLang flags] [--vase-* flags]``.

Every SGLang flag works as with ``python -m sglang.launch_server``. The ``--vase-*`` flags set the
eviction defaults (requests may override them, see ``sglang_vase.config``). The launcher also:
- serves the embedded SmolLM2-135M model when no ``--model-path`` is given, and a named real model
  (``sglang_vase.models.NAMED_MODELS``: ``--model-path qwen2.5-coder-1.5b``) built on first use, each
  with eviction defaults sized for it;
- on a machine without CUDA, sets SGLang's CPU route up (device, torch_native attention, no CUDA
  graphs, bounded KV pool and request count) and says so in one log line;
- adds the flags eviction needs (page size 1; on CUDA no prefill CUDA graph) and refuses, at
  startup, the flags it cannot honour. SGLang's radix cache and overlap scheduler stay on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sglang_vase.config import DISABLED, ENV_VAR, MODES, VaseParams
from sglang_vase.models import NAMED_MODELS
from sglang_vase.policies import POLICIES

logger = logging.getLogger("sglang_vase")

# CPU-route sizes: enough for tests and demos on a small machine (SGLang would take ~70% of RAM).
CPU_MAX_TOTAL_TOKENS = "65536"
CPU_MAX_RUNNING_REQUESTS = "64"
# SGLang's CPU route, as this launcher sets it up; tests and benchmarks start plain SGLang with
# these too (sglang_vase.serving). An idle scheduler otherwise spins a whole core the model needs.
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}
CPU_FLAGS = (("--device", "cpu"), ("--attention-backend", "torch_native"), ("--disable-cuda-graph", None),
             ("--sleep-on-idle", None))
CPU_SIZE_FLAGS = (("--max-total-tokens", CPU_MAX_TOTAL_TOKENS), ("--max-running-requests", CPU_MAX_RUNNING_REQUESTS))
# The embedded 135M model has an 8k context: the paper's B = 4096 would never evict in a demo.
EMBEDDED_BUDGET, EMBEDDED_WINDOW = 128, 32

# Flags eviction cannot honour: (flag, reason). A flag given with a false-y value is fine.
REFUSED_FLAGS = {
    "--speculative-algorithm": "speculative decoding writes draft KV that eviction would move",
    "--enable-mixed-chunk": "mixed prefill/decode batches compute decode positions from the physical length",
    "--enable-hierarchical-cache": "the hierarchical cache stores rows that eviction compacts",
    "--enable-dp-attention": "DP attention is not supported with eviction yet",
}
# Flags whose value must be one of these with eviction: (allowed values, reason).
VALUED_FLAGS = {
    "--page-size": (("1",), "token-level eviction needs --page-size 1"),
    "--pp-size": (("1",), "pipeline parallelism cannot be used with KV eviction yet"),
    "--pipeline-parallel-size": (("1",), "pipeline parallelism cannot be used with KV eviction yet"),
    "--attn-dp-size": (("1",), "DP attention is not supported with eviction yet"),
    "--attention-data-parallel-size": (("1",), "DP attention is not supported with eviction yet"),
    "--disaggregation-mode": (("null",), "prefill/decode disaggregation is not supported with eviction yet"),
    "--cuda-graph-backend-prefill": (("disabled",), "a prefill CUDA graph would record its capture batch's "
                                     "queries into the query ring (decode graphs stay on)"),
}


def vase_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_vase.launch_server", add_help=False)
    g = p.add_argument_group("sglang-vase (KV-cache eviction)")
    g.add_argument("--vase-policy", default="vase", choices=sorted(POLICIES) + [DISABLED],
                   help="eviction policy for requests that do not choose one; 'none' = plain SGLang")
    g.add_argument("--vase-budget", type=int, default=None,
                   help=f"B: KV slots kept per request, layer and KV head after an eviction (default "
                        f"{VaseParams.budget}; {EMBEDDED_BUDGET} when serving the embedded model, "
                        + ", ".join(f"{m.budget} for {n}" for n, m in NAMED_MODELS.items()) + ")")
    g.add_argument("--vase-window", type=int, default=None,
                   help=f"R: recency window = observation window = eviction period; B > R, B %% R == 0 "
                        f"(default {VaseParams.window}; {EMBEDDED_WINDOW} for the embedded model, "
                        + ", ".join(f"{m.window} for {n}" for n, m in NAMED_MODELS.items()) + ")")
    g.add_argument("--vase-n-large", type=int, default=None,
                   help="slots pinned for the largest-magnitude values (default budget // 4)")
    g.add_argument("--vase-seed", type=int, default=None,
                   help="server seed: requests without their own seed derive one from it and their id")
    g.add_argument("--vase-keep-prompt", action="store_true",
                   help="never evict the prompt (it stays shared in the radix cache); B then counts generated "
                        "tokens: footprint prompt + B + R (default: the paper's, B counts every token)")
    g.add_argument("--vase-mode", default=VaseParams.mode,
                   help=f"{' or '.join(MODES)}: when requests evict: static = every R tokens past B + R (the paper's schedule); "
                        "pressure = keep the full cache until the KV pool runs short, then evict the requests "
                        "that free the most (a request never needs more than its static footprint)")
    g.add_argument("--vase-sort-kept", action="store_true",
                   help="store kept tokens in position order (default: [pinned, sampled], as the paper's code)")
    g.add_argument("--vase-ring-rows", type=int, default=None,
                   help="query-ring rows = requests that can evict at once (default: KV pool // (B + R), "
                        "at most --max-running-requests); raise it when requests ask for smaller budgets")
    g.add_argument("--vase-workspace-mb", type=int, default=VaseParams.workspace_mb,
                   help="bound on one eviction round's transient memory, charged to the KV budget")
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


def _replace_value(argv: list[str], flag: str, value: str) -> None:
    """Set the value of ``flag``, present in argv as ``--f v`` or ``--f=v``."""
    for i, a in enumerate(argv):
        if a == flag:
            argv[i + 1] = value
            return
        if a.startswith(flag + "="):
            argv[i] = f"{flag}={value}"
            return
    raise KeyError(flag)


def _ensure(argv: list[str], flag: str, value: str | None = None) -> str | None:
    """Append ``flag [value]`` unless present; the flag as added ('--f v'), or None."""
    if _flag_value(argv, flag) is not None:
        return None
    argv += [flag] if value is None else [flag, value]
    return flag if value is None else f"{flag} {value}"


class LaunchError(ValueError):
    """A flag combination sglang-vase refuses; the message says which and why."""


def prepare(argv: list[str], cuda_available: bool | None = None) -> tuple[VaseParams, list[str], dict, list[str]]:
    """Split and check the command line: (eviction defaults, SGLang argv, env to set, log notes)."""
    ns, rest = vase_parser().parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--vase")]
    if unknown:
        raise LaunchError(f"unknown sglang-vase flag(s) {unknown}; see --help")
    argv, notes = list(rest), []
    model_path = _flag_value(argv, "--model-path")
    label, sized = _served_model(model_path)
    budget = ns.vase_budget if ns.vase_budget is not None else (sized[0] if sized else VaseParams.budget)
    window = ns.vase_window if ns.vase_window is not None else (sized[1] if sized else VaseParams.window)
    params = VaseParams(
        policy=ns.vase_policy, budget=budget, window=window, n_large=ns.vase_n_large, seed=ns.vase_seed,
        keep_prompt=ns.vase_keep_prompt, mode=ns.vase_mode, sort_kept=ns.vase_sort_kept, ring_rows=ns.vase_ring_rows, workspace_mb=ns.vase_workspace_mb,
    )
    try:
        params.validate()
    except ValueError as e:
        raise LaunchError(f"invalid --vase-* flags: {e}") from None

    env = {ENV_VAR: params.to_json()}
    if model_path is None:
        from sglang_vase.models import prepare_default_model

        argv += ["--model-path", prepare_default_model(verbose=True)]
        notes.append("serving the embedded SmolLM2-135M-Instruct (no --model-path given)")
    elif model_path in NAMED_MODELS:
        from sglang_vase.models import prepare_named_model

        _replace_value(argv, "--model-path", prepare_named_model(model_path, verbose=True))
        if _ensure(argv, "--served-model-name", model_path):
            notes.append(f"serving {label} as --served-model-name {model_path}")

    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        env.update(CPU_ENV)
        added = [a for f, v in CPU_FLAGS + CPU_SIZE_FLAGS if (a := _ensure(argv, f, v))]
        notes.append(f"no CUDA device: SGLang's CPU route (SGLANG_USE_CPU_ENGINE=1{', ' if added else ''}{', '.join(added)})")
        binding = cpu_rank_threads(argv)
        if binding:
            env.update(binding)
            notes.append("CPU ranks share the cores: " + ", ".join(f"{k}={v}" for k, v in binding.items()))

    if params.enabled:
        for flag, why in REFUSED_FLAGS.items():
            value = _flag_value(argv, flag)
            if value is not None and value.lower() not in ("false", "0", "none"):
                raise LaunchError(f"{flag} cannot be used with KV eviction: {why} (or pass --vase-policy none)")
        for flag, (allowed, why) in VALUED_FLAGS.items():
            value = _flag_value(argv, flag)
            if value is not None and value.lower() not in allowed:
                raise LaunchError(f"{flag} {value}: {why} (or pass --vase-policy none)")
        needed = [("--page-size", "1")]
        if cuda_available:
            needed.append(("--cuda-graph-backend-prefill", "disabled"))
        added = [a for f, v in needed if (a := _ensure(argv, f, v))]
        if added:
            notes.append(f"KV eviction needs {', '.join(added)} (added)")
        backend = page_one_attention_backend(argv) if cuda_available else None
        if backend is not None:
            argv += ["--attention-backend", backend]
            notes.append(f"SGLang's default attention backend on this GPU (compute capability 10.x: trtllm_mha or "
                         f"fa4) raises the page size to 64 or 128; KV eviction needs page size 1: --attention-"
                         f"backend {backend} (added)")
        notes.append(f"eviction defaults: policy {params.policy}, --vase-budget {params.budget}, --vase-window "
                     f"{params.window}, --vase-n-large {params.n_large if params.n_large is not None else 'budget // 4'}, "
                     f"--vase-seed {params.seed}, --vase-keep-prompt {params.keep_prompt}, --vase-mode {params.mode}, --vase-sort-kept {params.sort_kept}, --vase-ring-rows "
                     f"{params.ring_rows if params.ring_rows is not None else 'auto'}, --vase-workspace-mb "
                     f"{params.workspace_mb}" + (f" (budget and window sized for {label})"
                                                 if sized and ns.vase_budget is None else ""))
    else:
        notes.append("--vase-policy none: plain SGLang (requests may not ask for eviction)")
    return params, argv, env, notes


ATTENTION_BACKEND_FLAGS = ("--attention-backend", "--prefill-attention-backend", "--decode-attention-backend")


def page_one_attention_backend(argv: list[str]) -> str | None:
    """A page-size-1 attention backend to name when SGLang's own default would raise the page size:
    on compute capability 10.x it picks trtllm_mha (page 64) or fa4 (page 128). The one SGLang picks
    on other GPUs (flashinfer when installed, else triton) works with page size 1. None when the user
    named a backend (``check_resolved`` refuses one that needs larger pages) or the default is fine."""
    if any(_flag_value(argv, f) is not None for f in ATTENTION_BACKEND_FLAGS):
        return None
    from sglang.srt.runtime_context import get_platform

    if not get_platform().is_sm100:
        return None
    return "flashinfer" if get_platform().has_flashinfer else "triton"


def check_resolved(server_args) -> None:
    """Refuse what SGLang's own resolution of the flags leaves eviction unable to honour (the page
    size an attention backend forces), before any process starts."""
    from sglang.srt.arg_groups.model_override_base import resolved_view

    server_args.resolve_once()
    view = resolved_view(server_args)
    if view.page_size != 1:
        backends = {view.attention_backend, view.prefill_attention_backend, view.decode_attention_backend} - {None}
        raise LaunchError(
            f"SGLang resolved --page-size {view.page_size} for attention backend(s) {sorted(backends)}; token-level "
            f"eviction needs page size 1: name --attention-backend flashinfer or triton (or pass --vase-policy none)")


def cpu_rank_threads(argv: list[str]) -> dict:
    """Env giving each of SGLang's CPU ranks (dp x tp x pp processes) its own cores, when there is
    more than one: SGLang asks for one NUMA node a rank unless SGLANG_CPU_OMP_THREADS_BIND lists
    them, and each rank would otherwise run as many torch threads as the machine has cores."""
    ranks = 1
    for names in (("--dp-size", "--data-parallel-size"), ("--tp-size", "--tensor-parallel-size"),
                  ("--pp-size", "--pipeline-parallel-size")):
        value = next((v for n in names if (v := _flag_value(argv, n))), None)
        ranks *= int(value) if value else 1
    if ranks == 1:
        return {}
    env = {}
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // ranks)
    if "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ:
        groups = [[cores[(i * per + j) % len(cores)] for j in range(per)] for i in range(ranks)]
        env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, g)) for g in groups)
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(per)
    return env


def _served_model(model_path: str | None) -> tuple[str, tuple[int, int] | None]:
    """(what the log calls the model, its (budget, window) defaults or None for a user's model)."""
    from sglang_vase.models import MODEL_NAME, default_model_dir, named_model_dir

    if model_path is None or os.path.realpath(model_path) == os.path.realpath(default_model_dir()):
        return f"the embedded {MODEL_NAME}", (EMBEDDED_BUDGET, EMBEDDED_WINDOW)
    for name, model in NAMED_MODELS.items():
        if model_path == name or os.path.realpath(model_path) == os.path.realpath(named_model_dir(name)):
            return model.folder, (model.budget, model.window)
    return model_path, None


def check_model(server_args) -> None:
    """Refuse models eviction cannot honour before SGLang starts (``compat.model_refusals``)."""
    from sglang.srt.configs.model_config import ModelConfig

    from sglang_vase.compat import model_refusals

    reasons = model_refusals(ModelConfig.from_server_args(server_args))
    if reasons:
        raise LaunchError(f"KV eviction cannot run with {'; '.join(reasons)} (or pass --vase-policy none)")


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

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(sglang_argv)
    if params is not None and params.enabled:
        try:
            check_resolved(server_args)
            check_model(server_args)
        except LaunchError as e:
            vase_parser().exit(2, f"error: {e}\n")
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()

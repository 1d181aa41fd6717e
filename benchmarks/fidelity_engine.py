"""The free-generation part of benchmarks/fidelity.py (``--engine``, part 2 of its docstring): one
sglang-vase server generates every (plain policy, compression, seed) x prompt while the replay runs,
and each output is checked for repetition loops."""

from __future__ import annotations

import concurrent.futures as cf
import shlex
import threading
import time
from collections import Counter

from common import TEMPERATURE, TOP_P
from fidelity_configs import FULL
from sglang_vase.serving import Server

# One torch thread per server process: the replay shares the cores.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Loop detectors (see fidelity.py's docstring).
LOOP_NGRAM = 20
LOOP_MIN_COUNT = 3
TAIL_FRACTION = 0.25
TAIL_MAX_PERIOD = 64
TAIL_MIN_REPEATS = 3


def has_ngram_loop(tokens: list[int], n: int = LOOP_NGRAM, min_count: int = LOOP_MIN_COUNT) -> bool:
    """Some n-gram occurs >= min_count times (overlapping occurrences count)."""
    if len(tokens) < n:
        return False
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return max(counts.values()) >= min_count


def has_tail_loop(tokens: list[int], fraction: float = TAIL_FRACTION, max_period: int = TAIL_MAX_PERIOD,
                  min_repeats: int = TAIL_MIN_REPEATS) -> bool:
    """The last ``fraction`` of the tokens is periodic with a period p <= max_period repeated >= min_repeats times."""
    tail = tokens[len(tokens) - int(len(tokens) * fraction):]
    for p in range(1, min(max_period, len(tail) // min_repeats) + 1):
        if all(tail[i] == tail[i + p] for i in range(len(tail) - p)):
            return True
    return False


def distinct_ngram_ratio(tokens: list[int], n: int = 4) -> float | None:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


class EngineRun(threading.Thread):
    """The free-generation part in a background thread, so that the server's start (minutes on a
    loaded CPU) and its batched decoding overlap the replay. Every config (plain policy name,
    released order, compression, budget, seed) x prompt is one request, all in flight at once (up to
    --engine-concurrency). ``abort()`` kills the server; ``join()`` then ``outcome()``."""

    def __init__(self, args, model_path: str, prompts: list[dict], configs: list[dict], t_start: float):
        super().__init__(name="fidelity-engine", daemon=True)
        self.args, self.model_path, self.prompts, self.configs, self.t_start = args, model_path, prompts, configs, t_start
        self.cancel = threading.Event()
        self.server: Server | None = None
        self.runs: list[dict] = []
        self.info: dict = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 -- re-raised by outcome()
            self.error = e
        finally:
            if self.server is not None:
                self.server.stop()

    def abort(self) -> None:
        self.cancel.set()
        if self.server is not None:
            self.server.stop()

    def outcome(self) -> tuple[list[dict], dict]:
        if self.error is not None:
            raise RuntimeError(f"engine part failed: {self.error}") from self.error
        return self.runs, self.info

    def _run(self) -> None:
        args, t0 = self.args, time.time()
        jobs = [(cfg, p) for cfg in self.configs for p in self.prompts]
        server_budget = max([c["budget"] for c in self.configs if c["policy"] != FULL] or [2 * args.window])
        self.server = server = Server(
            ["--model-path", self.model_path, "--vase-budget", str(server_budget), "--vase-window", str(args.window),
             "--random-seed", "0"], env=SERVER_ENV, wait=False)
        self.info = {"server_cmd": shlex.join(server.cmd), "requests": len(jobs)}
        server.wait_ready(timeout=900, cancel=self.cancel)
        self.info["startup_seconds"] = time.time() - t0
        print(f"[fidelity] engine: server up in {self.info['startup_seconds']:.0f}s; {len(jobs)} requests of "
              f"{args.cont_len} tokens", flush=True)

        def one(item):
            cfg, p = item
            vase = False if cfg["policy"] == FULL else {
                "policy": cfg["policy"], "budget": cfg["budget"], "window": args.window, "seed": cfg["seed"]}
            res = server.generate(input_ids=p["input_ids"], max_new_tokens=args.cont_len, vase=vase, timeout=7200,
                                  temperature=TEMPERATURE, top_p=TOP_P, ignore_eos=True)
            ids = res["output_ids"]
            meta = res.get("meta_info", {})
            return {**{k: cfg[k] for k in ("policy", "order", "compression", "budget", "seed")}, "prompt": p["index"],
                    "tokens": len(ids), "loop": has_ngram_loop(ids), "tail_loop": has_tail_loop(ids),
                    "distinct4": distinct_ngram_ratio(ids),
                    "evictions": (meta.get("vase") or {}).get("evictions", 0)}

        t1 = time.time()
        with cf.ThreadPoolExecutor(max_workers=max(1, min(args.engine_concurrency, len(jobs)))) as ex:
            futures = [ex.submit(one, item) for item in jobs]
            for k, fut in enumerate(cf.as_completed(futures), 1):
                self.runs.append(fut.result())
                if k % max(1, len(futures) // 10) == 0 or k == len(futures):
                    print(f"[fidelity] engine {k}/{len(futures)} (elapsed {time.time() - self.t_start:.0f}s)",
                          flush=True)
        self.info["generate_seconds"] = time.time() - t1
        self.info["generated_tokens"] = sum(r["tokens"] for r in self.runs)
        self.info["seconds"] = time.time() - t0

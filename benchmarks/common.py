"""What the benchmarks share: where data and results live, the math prompt and sampling settings,
chat-formatted prompt ids, the ``--shard`` argument, and the machine (and commit) a result was
measured on."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "reasoning"
RESULTS_DIR = REPO / "benchmarks" / "results"
# The paper's math prompt and sampling (VASE_SPEC, evaluation protocol).
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
TEMPERATURE = 0.6
TOP_P = 0.95


def problems(path: Path) -> Iterator[tuple[int, dict, str]]:
    """(line number, row, question) for every row of a JSONL file that has a problem or question."""
    with open(path) as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            question = row.get("problem") or row.get("question")
            if question:
                yield line_no, row, question


def chat_ids(tokenizer, text: str, system: str | None = None) -> list[int]:
    """``text`` as the user turn of the model's chat template (after ``system``), ready to generate."""
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(((system + "\n") if system else "") + text)["input_ids"])
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def shard_arg(text: str) -> tuple[int, int]:
    """``--shard K/N`` (0 <= K < N): this process takes the K-th of every N units of work."""
    k, sep, n = text.partition("/")
    if not sep or not k.isdigit() or not n.isdigit() or not 0 <= int(k) < int(n):
        raise argparse.ArgumentTypeError(f"--shard: K/N with 0 <= K < N, got {text!r}")
    return int(k), int(n)


def git_commit() -> str | None:
    """The commit the benchmark code ran on (with ``+dirty`` when the tree has changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info(script: str | None = None, argv: list[str] | None = None) -> dict:
    """Where and how a result was measured: date, command, commit, machine, library versions."""
    import torch

    cmd = [sys.executable, *sys.argv] if argv is None else [sys.executable, script or sys.argv[0], *argv]
    cuda = torch.cuda.is_available()
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(cmd),
        "commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    for package in ("sglang", "transformers"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:  # noqa: BLE001 -- informational only
            info[package] = None
    return info

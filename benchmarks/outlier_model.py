"""The outlier model: the embedded SmolLM2-135M with abnormally large values on newline tokens,
built here for the benchmarks and tests that study value outliers (``fidelity.py --outlier-model``,
``tests/test_outlier_model.py``); it is not served.

SmolLM2's value ranges are mild (the largest per (layer, head) 1.5-3.5x the median); VaSE was made
for models with abnormally large values (Qwen3). The outlier model gives the embedded model such
values on a small set of tokens, newlines (~5% of the tokens of a math solution), in layer 0, and
makes its output depend on them (see ``_build_outlier``). Measured when these constants were set
(fp32, the first 900 tokens of MATH-500 problems 0-5 with their solutions): perplexity 3.14 ->
3.82; hiding the 31 newlines from layer 0's attention moves the next-token distributions by KL
0.30, hiding 31 random tokens by 0.002-0.056 (5 draws; SmolLM2 itself: 0.003 and <= 0.0007). A
gain of 0.15 gave perplexity 3.37 but KL 0.09 against up to 0.017. Layer 0 reads the token
embeddings only, so a linear read-out of its input can single out the newline tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sglang_vase.models import MANIFEST, MODEL_NAME, cache_root, prepare_default_model, prepare_folder, sha256_file

OUTLIER_LAYER = 0
OUTLIER_VALUE = 20.0  # added to one value channel per KV head, times the detector (1 for "\n")
OUTLIER_GAIN = 0.1  # scales that channel's o_proj columns: how much the output leans on it
# Least-squares weight of the calibration text's tokens against the whole vocabulary's.
_CALIBRATION_WEIGHT = 10.0
# Math-solution text whose tokens the detector must get right (newline -> 1, anything else -> 0).
CALIBRATION_TEXT = r"""To solve this problem, we first write the equation in standard form.
Let $x$ be the number of apples. Then $3x + 5 = 20$, so $3x = 15$ and $x = 5$.

Step 1: Compute the sum of the first $n$ positive integers, $\frac{n(n+1)}{2}$.
Step 2: Substitute $n = 10$ to get $\frac{10 \cdot 11}{2} = 55$.

We have that $r = \sqrt{0^2 + 3^2} = 3.$ The angle is $\theta = \frac{\pi}{2}$, therefore the point is $(3, \frac{\pi}{2})$.

Since the triangle is a right triangle, by the Pythagorean theorem $a^2 + b^2 = c^2$.
Hence $c = \sqrt{6^2 + 8^2} = \sqrt{100} = 10$.

The probability is the number of favorable outcomes divided by the total number of outcomes:
$P = \frac{4}{52} = \frac{1}{13}$.

Factor the quadratic: $x^2 - 5x + 6 = (x - 2)(x - 3)$, so the roots are $x = 2$ and $x = 3$.
The final answer is $\boxed{5}$.

First, note that $f(x) = 2x^2 - 4x + 1$ has its vertex at $x = 1$.
Next, we evaluate $f(1) = 2 - 4 + 1 = -1$, which is the minimum value.
Finally, the area of the circle is $\pi r^2 = 9\pi$, and the perimeter of the square is $4s = 24$.
"""
# Self-check of a build: on the calibration text, every newline's layer-0 value range is at least
# this many times the median range of the other tokens, in every KV head.
_OUTLIER_MIN_RATIO = 8.0


def outlier_model_dir() -> Path:
    """Where the outlier model lives once built; the name changes with its construction."""
    recipe = json.dumps([OUTLIER_LAYER, OUTLIER_VALUE, OUTLIER_GAIN, _CALIBRATION_WEIGHT, CALIBRATION_TEXT])
    return cache_root() / "models" / f"{MODEL_NAME}-newline-outliers-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"


def prepare_outlier_model(verbose: bool = False) -> str:
    """Return the folder of the outlier model (built from the embedded model on first use)."""
    return prepare_folder(outlier_model_dir(), _build_outlier, f"{MODEL_NAME} with newline value outliers", verbose)


def newline_detector(model, tokenizer):
    """Direction ``w`` with ``input_layernorm(embedding) . w`` = 1 for "\\n" and ~0 for tokens without a
    newline; returns (w, ids of the tokens whose text holds a newline)."""
    import torch

    embeddings = model.model.embed_tokens.weight.detach().float()
    x = model.model.layers[OUTLIER_LAYER].input_layernorm(embeddings)  # layer 0's input for each token
    newline = torch.tensor(["\n" in tokenizer.decode([i]) for i in range(x.shape[0])])
    calibration = torch.tensor(sorted(set(tokenizer(CALIBRATION_TEXT).input_ids)))
    rows = torch.cat([x, _CALIBRATION_WEIGHT * x[calibration]])
    target = torch.cat([newline.float(), _CALIBRATION_WEIGHT * newline[calibration].float()])
    w = torch.linalg.lstsq(rows, target[:, None], driver="gelsd").solution[:, 0]
    return w / (x[tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))[0]] @ w), newline.nonzero()[:, 0]


def _build_outlier(dest: Path) -> None:
    """Per KV head of layer 0: the value channel with the smallest weights (the least used) gains
    OUTLIER_VALUE x the newline detector, so newline tokens carry value ranges ~10-50x the median,
    and that channel's o_proj columns are scaled by OUTLIER_GAIN, so the attention-weighted sum of
    those large values reaches the residual stream: the output depends on the newlines' values."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = prepare_default_model()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    attn = model.model.layers[OUTLIER_LAYER].self_attn
    config = model.config
    head_dim = attn.head_dim
    group = config.num_attention_heads // config.num_key_value_heads
    with torch.no_grad():
        w, _ = newline_detector(model, tokenizer)
        for h in range(config.num_key_value_heads):
            rows = attn.v_proj.weight[h * head_dim : (h + 1) * head_dim]
            channel = int(rows.norm(dim=1).argmin())
            rows[channel] += OUTLIER_VALUE * w
            for g in range(h * group, (h + 1) * group):
                attn.o_proj.weight[:, g * head_dim + channel] *= OUTLIER_GAIN
    model.to(torch.bfloat16).save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))

    reloaded = AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32)
    ratio = _newline_range_ratio(reloaded, tokenizer)
    if ratio < _OUTLIER_MIN_RATIO:
        raise RuntimeError(f"outlier model: newline value ranges only {ratio:.1f}x the median")
    digests = {p.name: sha256_file(p) for p in sorted(dest.iterdir()) if p.is_file()}
    (dest / MANIFEST).write_text(json.dumps(
        {"source": source, "layer": OUTLIER_LAYER, "value": OUTLIER_VALUE, "gain": OUTLIER_GAIN,
         "min_newline_range_over_median": ratio, "sha256": digests}, indent=1))


def _newline_range_ratio(model, tokenizer) -> float:
    """Smallest (newline token's layer-0 value range / median range of the others) over the KV
    heads and newlines of the calibration text."""
    import torch

    ids = tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids
    values = {}
    hook = model.model.layers[OUTLIER_LAYER].self_attn.v_proj.register_forward_hook(
        lambda module, args, out: values.setdefault("v", out[0].detach()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    v = values["v"].view(ids.shape[1], model.config.num_key_value_heads, -1)
    ranges = v.amax(-1) - v.amin(-1)  # [T, H_kv]
    newline = torch.tensor(["\n" in tokenizer.decode([t]) for t in ids[0].tolist()])
    return float((ranges[newline].amin(0) / ranges[~newline].median(0).values).min())

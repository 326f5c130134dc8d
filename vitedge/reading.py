"""Reading the files vitedge is given: any failure of a parser becomes one VitedgeError naming the file.

Parsers raise far more than their documented errors on hostile bytes: torch's weights-only
unpickler raises IndexError, KeyError or struct.error on random data, text readers
UnicodeDecodeError, YAML and JSON nested thousands deep RecursionError. ``reading`` turns
every one of them (anything but a VitedgeError, an interrupt or an exit) into "cannot read
<what> <file>: <cause>", so each reader states what it reads instead of listing exceptions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from .errors import VitedgeError

# Metadata, reports, recipes and profiles are kilobytes; anything far larger is not one of them.
MAX_TEXT_BYTES = 64 << 20


def describe(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none (KeyError: 'x' → "KeyError 'x'")."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start}: {exc.reason})"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, MemoryError):
        return "too large for the memory available"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:  # torch's weights-only refusal: the cause is after its long preamble
        cause = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
        return f"not a weights-only PyTorch checkpoint (unpickler: {cause[:160]})"
    first = text.splitlines()[0] if text else ""
    if not first or isinstance(exc, (KeyError, IndexError)) or len(first) < 12:
        first = f"{type(exc).__name__} {first}".strip()
    return first[:200]


@contextlib.contextmanager
def reading(path, what: str):
    """Run a parser on ``path``; whatever it raises becomes ``VitedgeError("cannot read <what> <path>: ...")``."""
    try:
        yield
    except VitedgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the point: every parser failure is about the file, never a crash
        raise VitedgeError(f"cannot read {what} {path}: {describe(exc)}") from None


def read_text(path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A UTF-8 text file, refused (one line) when missing, larger than ``max_bytes`` or not UTF-8."""
    path = Path(path)
    with reading(path, what):
        if not path.is_file():
            raise VitedgeError(f"{what} not found: {path}")
        size = path.stat().st_size
        if size > max_bytes:
            raise VitedgeError(f"{what} {path} is {size / 1e6:.0f} MB; a {what} is at most {max_bytes >> 20} MiB")
        return path.read_bytes().decode("utf-8")


def read_json(path, what: str):
    path = Path(path)
    text = read_text(path, what)
    with reading(path, what):
        return json.loads(text)


def read_yaml(path, what: str):
    """``yaml.safe_load`` of a text file (safe: no Python objects are ever built)."""
    return parse_yaml(read_text(path, what), path, what)


def parse_yaml(text: str, path, what: str):
    """``yaml.safe_load`` of ``text`` read from ``path``, failures named after the file."""
    import yaml

    with reading(path, what):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise VitedgeError(f"cannot read {what} {path}: it is not valid YAML: {str(exc).splitlines()[0]}") from None


def read_npy(path, what: str = "input array"):
    """A ``.npy`` array: header checked before loading (no pickled objects, data present, fits in memory)."""
    import numpy as np

    from .resources import require_memory

    path = Path(path)
    if not path.is_file():
        raise VitedgeError(f"{what} not found: {path}")
    with reading(path, what):
        with open(path, "rb") as handle:
            try:
                version = np.lib.format.read_magic(handle)
            except ValueError:
                raise VitedgeError(f"{path} is not a .npy array (no NumPy magic); save it with numpy.save") from None
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise VitedgeError(f"{path} is a .npy file of format version {version}; save it with numpy.save (1.0/2.0)")
            offset = handle.tell()
        if dtype.hasobject:
            raise VitedgeError(f"{path} holds Python objects (dtype {dtype}); vitedge reads numeric arrays only")
        needed = int(np.prod(shape, dtype=np.float64) * dtype.itemsize)
        present = path.stat().st_size - offset
        if needed > present:
            raise VitedgeError(f"{path} is truncated: its header declares {list(shape)} {dtype} ({needed} bytes), "
                               f"the file holds {present} bytes of data")
        require_memory(needed, f"reading {path} ({list(shape)} {dtype})", "pass a smaller array")
        return np.load(path, allow_pickle=False)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (models and checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

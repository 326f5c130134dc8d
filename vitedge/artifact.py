"""The artifact folder: vitedge.json, report.json/report.md, and atomic writes into it.

Every file lands by rename from a temporary file in the same folder, and ``staged_outdir``
builds a whole export in a hidden sibling folder that only replaces files in OUTDIR once
everything succeeded, so a failure never leaves half-written files behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ArtifactBusy, ValidationFailed, VitedgeError
from .reading import file_sha256, read_json
from .schema import ARTIFACT, REPORT, SCHEMA_VERSION, check, check_version

METADATA = "vitedge.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MODEL = "model.onnx"
# model.onnx rewritten for ONNX Runtime (fused attention; vitedge optimize), where it pays
OPTIMIZED_ORT = "model.ort.onnx"
GRAPHS = ("auto", "portable", "optimized")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def ensure_writable_dir(outdir: Path) -> None:
    """Create ``outdir`` (and parents) or fail with one line saying why."""
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=outdir, prefix=".vitedge-probe-")
        probe.close()
    except OSError as exc:
        raise VitedgeError(f"cannot write to output folder {outdir}: {exc.strerror or exc}") from None


LOCK = ".vitedge-lock"
STAGE_PREFIX = ".vitedge-stage-"
FAILED_SUFFIX = ".failed"
# Folders this process holds the writer lock of (re-entrant: an export inside a tune or bundle, a report update).
_HELD: dict[str, int] = {}


@contextlib.contextmanager
def writer_lock(folder: Path):
    """Hold ``folder``'s writer lock (``flock`` on FOLDER/.vitedge-lock) or refuse: one writer per folder at a time.

    A second process gets ArtifactBusy at once instead of interleaving its files with the
    first one's; the lock file goes when the writer ends (also on a signal), and a lock left
    by a killed process is free again because ``flock`` dies with its owner.
    """
    import fcntl

    key = str(Path(folder).resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path = Path(folder) / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ArtifactBusy(f"{folder} is being written by another vitedge process (pid {holder}); wait for it to "
                               "finish or write to another folder") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def refuse_if_busy(folder: Path) -> None:
    """Fail fast (ArtifactBusy) when another process writes ``folder`` now, before minutes of work.

    Only a probe: the lock that serialises the writers is taken when the writing starts.
    """
    folder = Path(folder)
    if (folder / LOCK).is_file() and str(folder.resolve()) not in _HELD:
        with writer_lock(folder):
            pass


def failed_attempt_dir(outdir: Path) -> Path:
    """Where a write that failed validation leaves its files for inspection: OUTDIR.failed beside OUTDIR."""
    outdir = Path(outdir).resolve()
    return outdir.with_name(outdir.name + FAILED_SUFFIX)


@contextlib.contextmanager
def staged_outdir(outdir: Path):
    """Yield a temporary folder; on success move its files into ``outdir``, on failure drop it.

    ``outdir`` is locked for the whole write (ArtifactBusy for a second writer). When the
    body raises ValidationFailed, ``outdir`` keeps what it held (the previous good artifact,
    or nothing) and the failed attempt moves to ``OUTDIR.failed/`` (replacing an older one),
    named in the error.
    """
    outdir = Path(outdir)
    # The folders this call creates (OUTDIR and any missing parents), innermost first.
    created = [p for p in (outdir, *outdir.parents) if not p.exists()]
    ensure_writable_dir(outdir)
    try:
        with writer_lock(outdir):
            stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=outdir))
            try:
                yield stage
                for item in stage.iterdir():
                    os.replace(item, outdir / item.name)
            except ValidationFailed as exc:
                if any(p.name.startswith(STAGE_PREFIX) for p in outdir.resolve().parents):
                    raise  # a write inside another one's stage (a tune candidate): the outer write decides
                failed = keep_failed_attempt(stage, outdir)
                kept = "is unchanged" if outdir not in created else "was not written"
                raise type(exc)(f"{exc}; {outdir} {kept}, the failed attempt is in {failed}") from None
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def staged_copy(root: Path):
    """Yield a hidden copy of the artifact ``root`` to change; on success move the files that changed into
    ``root``; on ValidationFailed keep ``root`` as it was and move the copy to ``ROOT.failed/``.

    Small files are copied, large ones hard-linked: every vitedge write replaces a file (atomic
    rename), never edits one in place, so a link never changes the original. ``root`` is locked
    for the whole change.
    """
    root = Path(root)
    with writer_lock(root):
        stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=root))
        try:
            originals = _copy_files(root, stage)
            try:
                yield stage
            except ValidationFailed as exc:
                failed = keep_failed_attempt(stage, root)
                raise type(exc)(f"{exc}; {root} is unchanged, the failed attempt is in {failed}") from None
            for item in stage.iterdir():
                if item.is_file() and not _unchanged(item, originals.get(item.name)):
                    os.replace(item, root / item.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _copy_files(root: Path, stage: Path) -> dict[str, os.stat_result]:
    """``root``'s files (not hidden ones, not folders) into ``stage``; returns the originals' stats."""
    originals = {}
    for item in root.iterdir():
        if not item.is_file() or item.name.startswith("."):
            continue
        info = item.stat()
        originals[item.name] = info
        if info.st_size > (1 << 20):
            try:
                os.link(item, stage / item.name)
                continue
            except OSError:  # a file system without hard links: copy
                pass
        shutil.copy2(item, stage / item.name)
    return originals


def _unchanged(staged: Path, original: os.stat_result | None) -> bool:
    """True for a staged file that is still the original (a link not replaced, or an untouched copy)."""
    if original is None:
        return False
    info = staged.stat()
    if (info.st_ino, info.st_dev) == (original.st_ino, original.st_dev):
        return True
    return info.st_size == original.st_size and info.st_mtime_ns == original.st_mtime_ns


def keep_failed_attempt(stage: Path, outdir: Path) -> Path:
    failed = failed_attempt_dir(outdir)
    if failed.is_dir():
        shutil.rmtree(failed)
    elif failed.exists():
        failed.unlink()
    os.replace(stage, failed)
    return failed


class Artifact:
    """An artifact folder on disk: its metadata, its report, its files."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta = self.root / METADATA
        if not meta.is_file():
            raise VitedgeError(f"{self.root} is not a vitedge artifact folder (no {METADATA}); run 'vitedge export' first")
        self.metadata = read_json(meta, "artifact metadata")
        check_version(self.metadata, meta, "artifact metadata")
        if self.metadata.get("kind") == "bundle":
            variants = self.metadata.get("variants")
            names = ", ".join(str(v.get("path", "?")) for v in (variants if isinstance(variants, list) else [])[:3]
                              if isinstance(v, dict))
            raise VitedgeError(f"{self.root} is a variant bundle; pass one of its variant folders ({names}, ...)")
        check(self.metadata, ARTIFACT, meta, "artifact metadata")
        self._model_checked = False
        model = self.root / self.metadata.get("model", MODEL)
        if model.is_file():  # cross-check vitedge.json against model.onnx now, before any command writes
            self._check_model(model)

    @property
    def model_path(self) -> Path:
        path = self.root / self.metadata.get("model", MODEL)
        if not path.is_file():
            raise VitedgeError(f"{path} is missing; re-run 'vitedge export'")
        self._check_model(path)
        return path

    def _check_model(self, path: Path) -> None:
        if not self._model_checked:
            stat = path.stat()
            key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, json.dumps(self.metadata, sort_keys=True, default=str))
            if key not in _MATCHED:
                check_model_matches(self.metadata, path, self.root / METADATA)
                _MATCHED.add(key)
            self._model_checked = True

    def model_for(self, precision: str | None = None) -> Path:
        """The model file of ``precision`` (fp32: model.onnx; fp16/int8: from vitedge.json's "quantized")."""
        if precision in (None, "fp32"):
            return self.model_path
        entry = self.metadata.get("quantized", {}).get(precision)
        if not entry:
            raise VitedgeError(f"{self.root} has no {precision} model; run 'vitedge quantize {self.root} --precision {precision}'")
        path = self.root / entry["model"]
        if not path.is_file():
            raise VitedgeError(f"{path} is missing; re-run 'vitedge quantize {self.root} --precision {precision}'")
        return path

    def ort_model(self, graph: str = "auto") -> tuple[Path, str]:
        """The FP32 graph ONNX Runtime runs, and which one it is: ``portable`` (model.onnx) or
        ``optimized`` (model.ort.onnx). ``auto`` takes the optimised one where 'vitedge optimize'
        wrote it for this model.onnx (its source hash matches) and it passed the fidelity check
        (one written with --no-validate runs only when asked for), else model.onnx."""
        if graph not in GRAPHS:
            raise VitedgeError(f"unknown graph '{graph}'; use one of {', '.join(GRAPHS)}")
        entry = self.metadata.get("optimized", {}).get("ort") or {}
        path = self.root / entry.get("model", OPTIMIZED_ORT)
        proven = bool((entry.get("fidelity") or {}).get("passed"))
        if graph == "portable" or (graph == "auto" and not (entry.get("written") and proven and path.is_file())):
            return self.model_path, "portable"
        if not entry.get("written") or not path.is_file():
            why = entry.get("reason", "not optimised yet")
            raise VitedgeError(f"{self.root} has no {OPTIMIZED_ORT} ({why}); run 'vitedge optimize {self.root}' "
                               "(--force writes it even when it is not faster) or use --graph portable")
        if file_sha256(self.model_path) != entry.get("source_sha256"):
            if graph == "auto":
                return self.model_path, "portable"
            raise VitedgeError(f"{path} was made from another model.onnx; run 'vitedge optimize {self.root}' again")
        return path, "optimized"

    def precisions(self) -> list[str]:
        """fp32 and every precision 'vitedge quantize' added."""
        return ["fp32", *self.metadata.get("quantized", {})]

    def report(self) -> dict:
        """report.json; an unreadable one counts as empty (every section is regenerated by the command that wrote it)."""
        path = self.root / REPORT_JSON
        if not path.is_file():
            return {}
        try:
            return check(read_json(path, "artifact report"), REPORT, path, "artifact report")
        except VitedgeError:
            return {}

    def update_report(self, section: str, data: dict) -> dict:
        """Set one section of report.json and regenerate report.md from it."""
        from .report import render_markdown

        with writer_lock(self.root):
            report = self.report()
            report[section] = data
            write_json_atomic(self.root / REPORT_JSON, report)
            write_text_atomic(self.root / REPORT_MD, render_markdown(self.metadata, report))
        return report


# (model file, mtime, size, metadata) already cross-checked in this process: big graphs are parsed once.
_MATCHED: set[tuple] = set()


def check_model_matches(metadata: dict, model: Path, meta_path: Path) -> None:
    """``model.onnx`` is the graph ``vitedge.json`` describes: input name and shape, outputs, opset.

    A folder whose two files disagree (one replaced, edited or from another export) would
    otherwise reach ONNX Runtime with the wrong feeds, or validate only some of its outputs.
    """
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends on damaged files
        from .reading import describe

        raise VitedgeError(f"cannot read {model}: {describe(exc)}; re-run 'vitedge export'") from None
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    fix = f"{meta_path} does not describe {model}"
    expected = metadata["input"]
    if len(inputs) != 1 or inputs[0].name != expected["name"]:
        raise VitedgeError(f"{fix}: the graph's inputs are {[i.name for i in inputs]}, vitedge.json says "
                           f"'{expected['name']}'; re-export the artifact")
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in inputs[0].type.tensor_type.shape.dim]
    stated = list(expected["shape"])
    symbolic_ok = {0} if isinstance(stated[0], str) else set()
    if expected.get("resolution"):
        symbolic_ok |= {2, 3}
    if len(dims) != len(stated) or any(
            dim != want and not (i in symbolic_ok and isinstance(dim, str)) for i, (dim, want) in enumerate(zip(dims, stated))):
        raise VitedgeError(f"{fix}: the graph's input shape is {dims}, vitedge.json says {stated}; re-export the artifact")
    outputs = [o.name for o in proto.graph.output]
    if sorted(outputs) != sorted(metadata["outputs"]):
        raise VitedgeError(f"{fix}: the graph's outputs are {outputs}, vitedge.json says {metadata['outputs']}; "
                           "re-export the artifact")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset != metadata["opset"]:
        raise VitedgeError(f"{fix}: the graph has opset {opset}, vitedge.json says {metadata['opset']}; re-export the artifact")

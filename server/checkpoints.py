"""Atomic save and restore of the model's state.

A checkpoint is one ``torch.save`` file ``ckpt-<version>-<job id>-<attempt>.pt`` holding
``{"meta": ..., "strategy": ...}`` where ``meta`` records the model version and the id of the last
applied job, so a restart can reconcile the checkpoint with SQL. Checkpoints are blobs of the blob
store (:mod:`server.data.blobs`), written atomically; loading uses ``weights_only=True`` (no arbitrary
pickles) and reads the blob as a stream (a file, or the database's chunks fetched as torch reads: one
copy in memory). A torn or corrupt newest checkpoint is skipped in favour of the previous one.
Checkpoints named ``ckpt-<version>.pt`` (before checkpoints were ``data_files`` rows) are still read.

This module only reads and writes blobs; their ``data_files`` rows and the audited pruning are in
:mod:`server.jobs.checkpoint_rows`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from server.data.blobs import BlobStore
from server.data.files import FileRecord
from server.data.layout import CHECKPOINTS, checkpoint_name, parse_checkpoint_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself."""

    version: int
    last_job_id: str
    #: Metrics of the last job's computation, so the job can be finished after a crash without redoing it.
    last_job_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    meta: CheckpointMeta
    strategy_state: dict[str, Any]
    #: Its data path (``checkpoints/ckpt-...pt``).
    path: str


class CheckpointStore:
    """The checkpoints folder of the blob store."""

    def __init__(self, blobs: BlobStore, subdir: str = CHECKPOINTS) -> None:
        self.blobs = blobs
        self.subdir = subdir

    def relative_path(self, version: int, job_id: str, attempt: int) -> str:
        """Where :meth:`save` writes the checkpoint of ``job_id``'s attempt ``attempt`` at ``version``."""
        return f"{self.subdir}/{checkpoint_name(version, job_id, attempt)}"

    def save(self, meta: CheckpointMeta, strategy_state: dict[str, Any], attempt: int = 1) -> FileRecord:
        """Write a checkpoint atomically and return its record (its data path, size and SHA-256).

        The payload is serialized into memory once and written from there (``torch.save`` needs a
        seekable target; the model is in memory anyway).

        Args:
            meta: The model version and the job it includes (they name the blob, with ``attempt``).
            strategy_state: The strategy's state dict.
            attempt: The job's attempt that wrote it.
        """
        buffer = io.BytesIO()
        payload = {
            "meta": {
                "version": meta.version,
                "last_job_id": meta.last_job_id,
                "last_job_metrics": dict(meta.last_job_metrics),
            },
            "strategy": strategy_state,
        }
        torch.save(payload, buffer)
        relative = self.relative_path(meta.version, meta.last_job_id, attempt)
        return self.blobs.write(relative, buffer.getbuffer())

    def paths(self) -> list[str]:
        """Checkpoint data paths, newest (highest version) first."""
        found = [(parsed.version, p) for p in self.blobs.names(self.subdir) if (parsed := parse_checkpoint_name(p))]
        return [p for _, p in sorted(found, reverse=True)]

    def load(self, relative: str) -> Checkpoint:
        """Load one checkpoint (raises if it is missing, torn or not a checkpoint)."""
        with self.blobs.open(relative) as f:
            payload = torch.load(f, map_location="cpu", weights_only=True)
        meta = payload["meta"]
        return Checkpoint(
            CheckpointMeta(int(meta["version"]), str(meta["last_job_id"]), dict(meta["last_job_metrics"])),
            payload["strategy"],
            relative,
        )

    def load_latest(self) -> Checkpoint | None:
        """Load the newest readable checkpoint, or None when there is none."""
        for path in self.paths():
            try:
                return self.load(path)
            except Exception as exc:  # a torn or corrupt blob: fall back to the previous one
                log.error("checkpoint %s is unreadable (%s); trying an older one", path, exc)
        return None

    def prune(self, keep: str) -> list[FileRecord]:
        """Delete every checkpoint except ``keep``; return what was deleted.

        Older checkpoints still hold what later unlearn jobs removed, so they must not outlive them.
        """
        removed = []
        for path in self.paths():
            if path != keep:
                record = self.blobs.delete(path)
                if record:
                    removed.append(record)
        self.blobs.remove_temporary(self.subdir)
        return removed

"""Atomic save and restore of the model's state.

A checkpoint is one ``torch.save`` file ``ckpt-<version>-<job id>-<attempt>.pt`` holding
``{"meta": ..., "strategy": ...}`` where ``meta`` records the model version and the id of the last
applied job, so a restart can reconcile the checkpoint with SQL. Files are written to a temporary
name, fsynced and renamed; loading uses ``weights_only=True`` (no arbitrary pickles). A torn or
corrupt newest file is skipped in favour of the previous one. Files named ``ckpt-<version>.pt``
(before checkpoints were ``data_files`` rows) are still read.

This module only reads and writes files; their ``data_files`` rows and the audited pruning are in
:mod:`server.jobs.checkpoint_rows`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.data.files import FileRecord, purge, write_atomic
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
    path: Path


class CheckpointStore:
    """The checkpoints directory under the data directory."""

    def __init__(self, data_dir: Path, subdir: str = CHECKPOINTS) -> None:
        self.data_dir = data_dir
        self.subdir = subdir
        self.directory = data_dir / subdir
        self.directory.mkdir(parents=True, exist_ok=True)

    def relative_path(self, version: int, job_id: str, attempt: int) -> str:
        """Where :meth:`save` writes the checkpoint of ``job_id``'s attempt ``attempt`` at ``version``."""
        return f"{self.subdir}/{checkpoint_name(version, job_id, attempt)}"

    def save(self, meta: CheckpointMeta, strategy_state: dict[str, Any], attempt: int = 1) -> FileRecord:
        """Write a checkpoint atomically and return its record (path relative to the data directory).

        Args:
            meta: The model version and the job it includes (they name the file, with ``attempt``).
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
        data = buffer.getvalue()
        relative = self.relative_path(meta.version, meta.last_job_id, attempt)
        digest = write_atomic(self.data_dir / relative, data)
        return FileRecord(relative, len(data), digest)

    def paths(self) -> list[Path]:
        """Checkpoint files, newest (highest version) first."""
        found = [(parsed.version, p) for p in self.directory.iterdir() if (parsed := parse_checkpoint_name(p.name))]
        return [p for _, p in sorted(found, key=lambda item: (item[0], item[1].name), reverse=True)]

    def load_latest(self) -> Checkpoint | None:
        """Load the newest readable checkpoint, or None when there is none."""
        for path in self.paths():
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
                meta = payload["meta"]
                return Checkpoint(
                    CheckpointMeta(int(meta["version"]), str(meta["last_job_id"]), dict(meta["last_job_metrics"])),
                    payload["strategy"],
                    path,
                )
            except Exception as exc:  # a torn or corrupt file: fall back to the previous one
                log.error("checkpoint %s is unreadable (%s); trying an older one", path.name, exc)
        return None

    def prune(self, keep: Path) -> list[FileRecord]:
        """Delete every checkpoint except ``keep``; return what was deleted.

        Older checkpoints still hold what later unlearn jobs removed, so they must not outlive them.
        """
        removed = []
        for path in self.paths():
            if path != keep:
                record = purge(self.data_dir, f"{self.subdir}/{path.name}")
                if record:
                    removed.append(record)
        for stale in self.directory.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        return removed

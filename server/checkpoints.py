"""Atomic save and restore of the model's state.

A checkpoint is one ``torch.save`` file ``ckpt-<version>.pt`` holding ``{"meta": ..., "strategy": ...}``
where ``meta`` records the model version and the id of the last applied job, so a restart can
reconcile the checkpoint with SQL. Files are written to a temporary name, fsynced and renamed;
loading uses ``weights_only=True`` (no arbitrary pickles). A torn or corrupt newest file is skipped
in favour of the previous one.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.data.files import FileRecord, purge, write_atomic
from server.data.layout import CHECKPOINTS

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")


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

    def save(self, meta: CheckpointMeta, strategy_state: dict[str, Any]) -> FileRecord:
        """Write a checkpoint atomically and return its record (path relative to the data directory)."""
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
        relative = f"{self.subdir}/ckpt-{meta.version:010d}.pt"
        digest = write_atomic(self.data_dir / relative, data)
        return FileRecord(relative, len(data), digest)

    def paths(self) -> list[Path]:
        """Checkpoint files, newest (highest version) first."""
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

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

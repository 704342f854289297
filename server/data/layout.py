"""Where every blob lives (relative data paths, see :mod:`server.data.blobs`): the only module that spells a path.

Files a job writes carry the job's attempt number, so a job that runs again after a restart
never reuses the name of a file its interrupted attempt recorded (every name is recorded once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from server.storage.enums import DataFileKind

#: Folder of each kind of task data.
FOLDERS: dict[DataFileKind, str] = {
    DataFileKind.SPOOL: "spool",
    DataFileKind.PROBE: "probes",
    DataFileKind.MEMBER: "members",
    DataFileKind.RETAINED: "retained",
}
#: Folder of model checkpoints.
CHECKPOINTS = "checkpoints"
#: Suffixes of files being written (a crash can leave them; they are never recorded).
TEMPORARY_SUFFIXES = (".partial", ".tmp")
#: ``ckpt-<version>-<job id>-<attempt>.pt``; ``ckpt-<version>.pt`` from before checkpoints were rows.
_CHECKPOINT_NAME = re.compile(r"^ckpt-(?P<version>\d{10})(?:-(?P<job>.+)-(?P<attempt>\d+))?\.pt$")


@dataclass(frozen=True)
class CheckpointName:
    """What a checkpoint's file name says: the model version, and the job attempt that wrote it.

    ``job_id`` and ``attempt`` are None for a name from before checkpoints were ``data_files`` rows.
    """

    version: int
    job_id: str | None
    attempt: int | None


def checkpoint_name(version: int, job_id: str, attempt: int) -> str:
    """The file name of the checkpoint attempt ``attempt`` of job ``job_id`` writes at model ``version``.

    The job and attempt are in the name for the same reason as in task files: a version is reached
    again after a job fails or is re-run, and every recorded name must be new.
    """
    return f"ckpt-{version:010d}-{job_id}-{attempt}.pt"


def is_checkpoint_path(relative: str) -> bool:
    """Whether a data path is one of the model's checkpoints (``checkpoints/ckpt-...pt``)."""
    folder, _, name = relative.rpartition("/")
    return folder == CHECKPOINTS and _CHECKPOINT_NAME.match(name) is not None


def parse_checkpoint_name(name: str) -> CheckpointName | None:
    """Parses a checkpoint file name (or a path ending in one); None when it is not one."""
    found = _CHECKPOINT_NAME.match(name.rsplit("/", 1)[-1])
    if found is None:
        return None
    attempt = found["attempt"]
    return CheckpointName(int(found["version"]), found["job"], int(attempt) if attempt is not None else None)


@dataclass(frozen=True)
class DataLayout:
    """Paths under one data directory; every path handed out is relative to ``root``."""

    root: Path

    def absolute(self, relative: str) -> Path:
        """The absolute path of a relative data path."""
        return self.root / relative

    @staticmethod
    def spool(job_id: str) -> str:
        """The spool file of a Learn job."""
        return f"{FOLDERS[DataFileKind.SPOOL]}/{job_id}.spool"

    @staticmethod
    def job_file(kind: DataFileKind, job_id: str, attempt: int) -> str:
        """A probe, member or retained file written by attempt ``attempt`` of job ``job_id``."""
        return f"{FOLDERS[kind]}/{job_id}-{attempt}.npz"

    @staticmethod
    def rewritten_file(kind: DataFileKind, job_id: str, attempt: int, part: int) -> str:
        """A probe, member or retained file rewritten by a records unlearn (one ``part`` per task it touches)."""
        return f"{FOLDERS[kind]}/{job_id}-{attempt}-{part}.npz"

    @staticmethod
    def rewritten_spool(learn_job_id: str, job_id: str, attempt: int) -> str:
        """The spool of a queued Learn rewritten by attempt ``attempt`` of records unlearn ``job_id``."""
        return f"{FOLDERS[DataFileKind.SPOOL]}/{learn_job_id}-{job_id}-{attempt}.spool"

    @staticmethod
    def rewritten_spool_owner(relative: str) -> str:
        """The Learn job of a spool named by :meth:`rewritten_spool`."""
        return relative.rsplit("/", 1)[-1].split("-", 1)[0]

    @property
    def checkpoints(self) -> Path:
        """The checkpoint directory."""
        return self.root / CHECKPOINTS

    @staticmethod
    def checkpoint(version: int, job_id: str, attempt: int) -> str:
        """The checkpoint written by attempt ``attempt`` of job ``job_id`` at model ``version``."""
        return f"{CHECKPOINTS}/{checkpoint_name(version, job_id, attempt)}"

    def checkpoint_files(self) -> list[str]:
        """Every checkpoint file (not temporary ones), as relative paths."""
        directory = self.checkpoints
        if not directory.is_dir():
            return []
        return [f"{CHECKPOINTS}/{p.name}" for p in sorted(directory.iterdir()) if parse_checkpoint_name(p.name)]

    @staticmethod
    def is_temporary(relative: str) -> bool:
        """Whether a file is a leftover of an interrupted write."""
        return relative.endswith(TEMPORARY_SUFFIXES)

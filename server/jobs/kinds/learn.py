"""LEARN: train the model on a spooled stream; keep its probe, member and retained samples."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from functools import partial

import numpy as np
import torch
from sqlalchemy.orm import Session

from server.data import read_spool
from server.engine.protocol import LearnOptions, TaskData, TemporaryLearning
from server.jobs.context import JobContext, JobRun
from server.jobs.snapshot import Evaluated
from server.storage import DataFile, DataFileKind, DataFileRepository, Job, TaskRepository


def split(seed: int, task: str, n: int, holdout: float, max_probe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic (train, probe, member) index arrays for a stream of ``n`` samples.

    Seeded by the task's name, not the queue position, so the same mega-batch is split the same
    way whatever came before it (LURE's exact unlearning equals retraining only then).
    """
    n_probe = min(max(1, round(n * holdout)), max_probe, n - 1)
    task_seed = int.from_bytes(hashlib.sha256(task.encode()).digest()[:8], "little")
    order = np.random.default_rng([seed, task_seed]).permutation(n)
    probe, train = order[:n_probe], order[n_probe:]
    member = train[: min(n_probe, len(train))]  # trained on, kept only to measure membership inference
    return train, probe, member


class LearnHandler:
    """Runs LEARN jobs."""

    cancellable = True

    def compute(self, ctx: JobContext, run: JobRun) -> dict[str, float]:
        """Train on the job's spool, then record and write its probe, member and retained files."""
        job, layout = run.job, ctx.layout
        with ctx.blobs.open(spool_of(ctx, job)) as spool:
            inputs, labels, ids = read_spool(spool)
        digests = np.asarray(ids or ctx.sample_key.server_made(job.id, len(labels)))
        options = LearnOptions.from_dict(job.options)
        if "seed" not in job.options:  # queued by a version that resolved the seed in the worker
            options = replace(options, seed=ctx.settings.seed)
        train, probe, member = split(
            ctx.settings.seed, job.task, len(labels), options.holdout_fraction, ctx.settings.max_probe_samples
        )
        data = TaskData(torch.from_numpy(inputs[train]), torch.from_numpy(labels[train]))
        if options.temporary:
            # A side network of its own; its training data is kept (RETAINED) until commit or unlearn.
            report = temporary_learner(ctx).learn_temporary(job.task, data, options, run.progress)
        else:
            report = ctx.strategy.learn(job.task, data, options, run.progress, ctx.replay(exclude=job.task))
        check_finite(ctx, job.task, inputs[probe])
        # Every file names its samples (keyed digests) and their stream positions, so a records
        # unlearn can remove a person's samples from it and split the remaining stream again.
        arrays = {kind: sample_arrays(inputs, labels, digests, index) for kind, index in (
            (DataFileKind.PROBE, probe), (DataFileKind.MEMBER, member))}  # fmt: skip
        if report.retain is data:  # the whole training part, in order
            arrays[DataFileKind.RETAINED] = sample_arrays(inputs, labels, digests, train)
        elif report.retain is not None:  # a strategy's own selection (e.g. a replay buffer)
            arrays[DataFileKind.RETAINED] = {
                "inputs": report.retain.inputs.numpy(),
                "labels": report.retain.labels.numpy(),
            }
        paths = {kind: layout.job_file(kind, job.id, job.attempts) for kind in arrays}
        ctx.retry(lambda: self._record_intent(ctx, job, paths), "recording the job's files")
        for kind, named in arrays.items():  # retried: with blobs in the database a write is a transaction
            ctx.retry(partial(ctx.blobs.save_arrays, paths[kind], **named), "writing the job's files")
        metrics = {k: float(v) for k, v in report.metrics.items()}
        metrics.setdefault("samples", float(len(train)))
        metrics["probe_samples"] = float(len(probe))
        if options.temporary:
            metrics["temporary"] = 1.0  # the report marks temporary phases by it
        return metrics

    @staticmethod
    def _record_intent(ctx: JobContext, job: Job, paths: dict[DataFileKind, str]) -> None:
        """One row per file before it is written, so no byte of task data is ever unaccounted for."""
        with ctx.transaction() as session:
            files = DataFileRepository(session)
            for kind, path in paths.items():
                if files.get(path) is None:  # recorded by this attempt before a database blip
                    files.add(DataFile(kind=kind, task=job.task, job_id=job.id, path=path, bytes=0, sha256=""))

    def measure(self, ctx: JobContext, run: JobRun, evaluated: Evaluated) -> dict[str, float]:
        """Digest the files the computation wrote (outside the transaction: it reads them all)."""
        run.files = []
        for kind in (DataFileKind.PROBE, DataFileKind.MEMBER, DataFileKind.RETAINED):
            found = ctx.blobs.digest(ctx.layout.job_file(kind, run.job.id, run.job.attempts))
            if found is not None:
                run.files.append(found)
        return {}

    def commit(self, ctx: JobContext, session: Session, run: JobRun, job: Job, evaluated: Evaluated) -> list[str]:
        """Complete the file rows, consume the spool, mark the task learned."""
        files = DataFileRepository(session)
        for record in run.files:
            row = files.get(record.path)
            if row is not None:
                row.bytes, row.sha256 = record.bytes, record.sha256
        spools = [row.path for row in files.live(job_id=job.id, kind=DataFileKind.SPOOL)]
        for spool in spools:
            files.mark_purged(spool)  # consumed: the training data now lives only in the model
        task = TaskRepository(session).get_for_update(job.task)
        if task is not None:
            temporary = bool(job.options.get("temporary"))
            ttl = int(job.options.get("ttl_seconds", 0))
            ctx.lifecycle.task_learned(session, task, ctx.strategy.version, temporary=temporary, ttl_seconds=ttl)
            task.accuracy = evaluated.accuracies.get(task.name)
        return spools


def temporary_learner(ctx: JobContext) -> TemporaryLearning:
    """The strategy as a :class:`TemporaryLearning` one.

    Raises:
        ValueError: it has no temporary learning (the servicer refuses such requests up front; a job
            queued under another configuration fails with this message).
    """
    strategy = ctx.strategy
    if not isinstance(strategy, TemporaryLearning):
        raise ValueError(f"strategy {strategy.name!r} does not support temporary learning")
    return strategy


def spool_of(ctx: JobContext, job: Job) -> str:
    """The Learn job's spool: as its stream was written, or as a records unlearn rewrote it."""
    rows = ctx.read(lambda s: DataFileRepository(s).live(job_id=job.id, kind=DataFileKind.SPOOL), "reading the spool")
    return rows[0].path if rows else ctx.layout.spool(job.id)


def sample_arrays(
    inputs: np.ndarray, labels: np.ndarray, digests: np.ndarray, index: np.ndarray
) -> dict[str, np.ndarray]:
    """The arrays of a task-data file holding samples ``index`` of a stream: data, digests, positions."""
    return {
        "inputs": inputs[index],
        "labels": labels[index],
        "ids": digests[index],
        "positions": index.astype(np.int64),
    }


def check_finite(ctx: JobContext, task: str, inputs: np.ndarray) -> None:
    """Refuse a model whose outputs are no longer finite (training diverged, e.g. on huge inputs).

    Raising here fails the job before its checkpoint, and the model is restored from the last one,
    so a single bad stream cannot corrupt every other task.
    """
    name = task if ctx.strategy.task_incremental else None
    batch = torch.from_numpy(np.ascontiguousarray(inputs[:256]))
    logits = ctx.strategy.predictor().predict(name, batch)
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ValueError(
            "training diverged: the model's outputs are not finite after this learn; it was rolled back "
            "(check the input scale: features are expected roughly in [0, 1] or standardized)"
        )

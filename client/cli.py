"""The ``lethe`` command.

Client commands talk to a server given by ``--server HOST:PORT`` (env ``LETHE_SERVER``, default
127.0.0.1:50051; several, comma-separated: writes go to the primary, reads round-robin) with
``--token`` (env ``LETHE_TOKEN``). ``lethe serve`` and ``lethe db`` run the
daemon side and need the ``server`` extra.

A failure prints one line on stderr, ``lethe: CODE: message``, with a hint where one helps (an
unreachable server, a missing token), and exits non-zero: 1 for a refusal, 2 for bad input here,
130 after Ctrl-C. Never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from client import (
    EXPORT_FORMATS,
    DeadlineExceededError,
    ExportError,
    InvalidArgumentError,
    JobFailedError,
    LetheClient,
    LetheError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    pb,
)
from client.audit import (
    certificate_file,
    head_from_message,
    read_head_file,
    verify_audit,
    verify_certificate,
    warnings_in,
)
from client.datasets import Dataset, load_dataset, parse_classes
from protos.audit_signing import AuditPublicKey

DEFAULT_SERVER = "127.0.0.1:50051"
#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def _bar(fraction: float, width: int = 30) -> str:
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {fraction * 100:5.1f}%"


class _Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal, unless forced)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled

    def update(self, fraction: float, note: str = "") -> None:
        if self.enabled:
            print(f"\r{self.label:<9} {_bar(fraction)} {note[:40]:<40}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _client(args: argparse.Namespace) -> LetheClient:
    root = Path(args.ca).read_bytes() if args.ca else None
    certificate = Path(args.cert).read_bytes() if args.cert else None
    key = Path(args.key).read_bytes() if args.key else None
    return LetheClient(
        args.server, token=args.token, root_certificates=root, certificate_chain=certificate, private_key=key
    )


def _load(args: argparse.Namespace) -> Dataset:
    classes = parse_classes(args.classes) if args.classes else None
    dataset = load_dataset(args.dataset, classes=classes)
    if args.permute is not None:
        dataset = dataset.permute_pixels(args.permute)
    return dataset


def _state(value: int, enum: type) -> str:
    return enum.Name(value).lower()  # type: ignore[attr-defined]


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:6.2f}"


def _time(ts: object) -> str:
    seconds = getattr(ts, "seconds", 0)
    if not seconds:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _verified(task: pb.Task) -> str:
    if not task.HasField("forget_verified"):
        return "-"
    return "yes" if task.forget_verified else "NO"


def print_tasks(tasks: Sequence[pb.Task]) -> None:
    """A table of tasks; ``verified`` says whether an unlearned task's forgetting was verified."""
    print(
        f"{'task':<24} {'state':<11} {'samples':>8} {'accuracy':>8} {'relapse':>8} {'version':>8} {'verified':>8}"
        "  expires (UTC)"
    )
    for t in tasks:
        version = t.unlearned_version or t.learned_version
        expires = _time(t.expires_at) if t.HasField("expires_at") else ""
        print(
            f"{t.name:<24} {_state(t.state, pb.TaskState):<11} {t.samples:>8} {_pct(t.accuracy):>8} "
            f"{_pct(t.relapse):>8} {version:>8} {_verified(t):>8}  {expires}".rstrip()
        )


def forget_summary(metrics: Mapping[str, float]) -> list[str]:
    """Lines on an unlearn's verification and MIA, the measure next to its reference (docs/metrics.md)."""
    m, lines = metrics, []
    if m.get("side_network_deleted") == 1.0:
        return [
            "forgotten exactly: the task lived only in its side network, which was deleted with all its data "
            f"({m.get('unlearn_seconds', 0.0) * 1000:.1f} ms); the main model never held it"
        ]
    if "forget_verified" in m:
        classes = m.get("forget_reference_classes")
        why = f"chance for {classes:.0f} classes" if classes else "a model that never saw it, estimated on the probe"
        verified = bool(m["forget_verified"])
        attempts = int(m.get("forget_attempts", 1))
        lines.append(
            f"forget accuracy {m.get('forget_balanced_accuracy', math.nan):.1f}% balanced "
            f"(reference {m['forget_reference']:.1f}% = {why}; 95% interval "
            f"{m.get('forget_accuracy_low', math.nan):.1f}-{m.get('forget_accuracy_high', math.nan):.1f}%) "
            f"on {m.get('forget_samples', 0):.0f} probe samples; "
            f"members {m.get('forget_balanced_accuracy_members', math.nan):.1f}%; "
            f"{'verified' if verified else 'NOT verified'} (gap {m['forget_gap']:.1f}, "
            f"{m['forget_excess']:.1f} counted {'<=' if verified else '>'} "
            f"{m['forget_tolerance']:.1f})" + (f" after {attempts} attempts" if attempts > 1 else "")
        )
    if "mia_known" in m:
        sizes = f"{m.get('mia_members', 0):.0f}+{m.get('mia_nonmembers', 0):.0f}"
        if m["mia_known"] and "mia" in m:
            lines.append(
                f"MIA {m['mia']:.1f}% (null 95% {m['mia_null_low']:.0f}-{m['mia_null_high']:.0f}%, "
                f"p {m['mia_p_value']:.2f}, {sizes} samples)"
            )
        else:
            lines.append(f"MIA unknown (too few samples: {sizes})")
    return lines


def print_job(job: pb.Job) -> None:
    """One job as a line plus its metrics."""
    print(
        f"{job.id}  {_state(job.kind, pb.JobKind):<8} {job.task:<24} {_state(job.state, pb.JobState):<10} "
        f"v{job.model_version}  {job.message}"
    )
    for name, value in sorted(job.metrics.items()):
        print(f"    {name:<24} {value:.4g}")


def _wait(client: LetheClient, job: pb.Job, show: bool, *, check: bool = True) -> pb.Job:
    bar = _Progress("training" if job.kind in (pb.LEARN, pb.COMMIT) else "unlearning", show)

    def update(j: pb.Job) -> None:
        bar.update(j.progress, j.message)

    try:
        return client.wait(job.id, progress=update, check=check)
    finally:
        bar.done()


def cmd_learn(args: argparse.Namespace) -> int:
    dataset = _load(args)
    show = args.progress or sys.stderr.isatty()
    with _client(args) as client:
        upload = _Progress("upload", show)
        try:
            job = client.learn(
                args.task,
                dataset.inputs,
                dataset.labels,
                epochs=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.lr,
                temporary=args.temporary,
                ttl_seconds=args.ttl,
                idempotency_key=args.idempotency_key,
                progress=lambda sent, total: upload.update(sent / total, f"{sent}/{total} samples"),
                sample_ids=_read_ids([args.ids]) if args.ids else None,
            )
        except KeyboardInterrupt:
            upload.done()
            _error(
                "interrupted during the upload: the stream was cancelled, and the server keeps nothing of a "
                f"stream cut short (check with 'lethe jobs{_server_flag(args)}')"
            )
            return EXIT_INTERRUPTED
        upload.done()
        mode = " temporarily (side network; 'lethe commit' or 'lethe unlearn' it)" if args.temporary else ""
        print(f"queued learn job {job.id} for task {args.task} ({len(dataset)} samples){mode}")
        if job.sample_id_prefix:
            print(f"sample ids: {job.sample_id_prefix}0 ... {job.sample_id_prefix}{len(dataset) - 1} (stream order)")
        if args.no_wait:
            return 0
        try:
            print_job(_wait(client, job, show))
        except KeyboardInterrupt:
            return _left_running(job, args)
    return 0


def _server_flag(args: argparse.Namespace) -> str:
    """`` --server HOST:PORT`` when the follow-up commands need it to reach the same server."""
    return "" if args.server == os.environ.get("LETHE_SERVER", DEFAULT_SERVER) else f" --server {args.server}"


def _left_running(job: pb.Job, args: argparse.Namespace) -> int:
    """After Ctrl-C while waiting: the job goes on; say how to follow or cancel it."""
    at = _server_flag(args)
    cancel = f"'lethe cancel {job.id}{at}'"
    if job.kind == pb.UNLEARN:
        cancel += " (admin scope, only while it is queued: a running unlearn finishes)"
    _error(
        f"interrupted; {_state(job.kind, pb.JobKind)} job {job.id} keeps running on the server: follow it with "
        f"'lethe jobs {job.id} --wait{at}', cancel it with {cancel}"
    )
    return EXIT_INTERRUPTED


def _read_ids(values: list[str]) -> list[str]:
    """Sample ids from the command line: each value is a file of ids (one per line) or an id."""
    ids: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_file():
            ids += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            ids.append(value)
    return ids


def cmd_unlearn(args: argparse.Namespace) -> int:
    if not args.task and not args.ids:
        raise SystemExit("lethe unlearn: name a TASK, or samples with --ids FILE|ID ...")
    with _client(args) as client:
        if args.ids:
            ids = _read_ids(args.ids)
            job = client.forget_samples(ids, task=args.task, reason=args.reason, idempotency_key=args.idempotency_key)
            where = f"task {args.task}" if args.task else "every task holding them"
            print(f"unlearn job {job.id} for {job.sample_ids} samples in {where}: {_state(job.state, pb.JobState)}")
        else:
            job = client.unlearn(
                args.task, reason=args.reason, method=args.method, idempotency_key=args.idempotency_key
            )
            print(f"unlearn job {job.id} for task {args.task}: {_state(job.state, pb.JobState)}")
        if not args.no_wait:
            try:
                done = _wait(client, job, args.progress or sys.stderr.isatty())
            except KeyboardInterrupt:
                return _left_running(job, args)
            print_job(done)
            for line in forget_summary(done.metrics):
                print(line)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.commit(args.task, idempotency_key=args.idempotency_key)
        print(f"commit job {job.id} for task {args.task}: {_state(job.state, pb.JobState)}")
        if not args.no_wait:
            try:
                done = _wait(client, job, args.progress or sys.stderr.isatty())
            except KeyboardInterrupt:
                return _left_running(job, args)
            print_job(done)
    return 0


def cmd_locate(args: argparse.Namespace) -> int:
    ids = _read_ids(args.ids)
    with _client(args) as client:
        located = client.locate(ids)
    for task, count in sorted(located.tasks.items()):
        print(f"{task}\t{count}")
    print(f"unknown\t{located.unknown}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    dataset = _load(args)
    inputs, labels = dataset.inputs[: args.limit], dataset.labels[: args.limit]
    with _client(args) as client:
        prediction = client.predict(args.task or None, inputs, allow_unlearned=args.allow_unlearned)
    accuracy = float(np.mean(prediction.classes == labels) * 100)
    print(f"model version {prediction.model_version}: {len(labels)} samples, accuracy {accuracy:.2f}%")
    if args.show:
        print("predicted:", " ".join(map(str, prediction.classes[: args.show])))
        print("labels:   ", " ".join(map(str, labels[: args.show])))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print_tasks(client.tasks())
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.id:
            job = client.job(args.id)
            if args.wait and job.state not in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
                try:
                    job = _wait(client, job, args.progress or sys.stderr.isatty(), check=False)
                except KeyboardInterrupt:
                    return _left_running(job, args)
            print_job(job)
            return 0 if not args.wait or job.state == pb.SUCCEEDED else 1
        # The id first: it is what 'lethe jobs ID' and 'lethe cancel ID' take.
        print(f"{'id':<32}  {'kind':<8} {'task':<24} {'state':<10} {'version':<7} {'created (UTC)'}")
        for job in client.jobs(limit=args.limit):
            print(
                f"{job.id}  {_state(job.kind, pb.JobKind):<8} {job.task:<24} "
                f"{_state(job.state, pb.JobState):<10} v{job.model_version:<6} {_time(job.created_at)}"
            )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print_job(client.cancel(args.id))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    action = args.action or ("verify" if args.verify else "list")
    if action == "public-key":
        return _audit_public_key(args)
    if action == "verify":
        return _audit_verify(args)
    with _client(args) as client:
        events = client.audit_events(task=args.task or "")
    for e in events:
        print(f"{e.seq:>5} {_time(e.at)} {e.principal:<12} {e.action:<18} {e.task:<20} {e.details_json}")
    return 0


def _trusted_key(path: str | None) -> AuditPublicKey | None:
    return AuditPublicKey.from_pem(Path(path).read_bytes()) if path else None


def _audit_public_key(args: argparse.Namespace) -> int:
    with _client(args) as client:
        pem = client.audit_head().public_key
    key = AuditPublicKey.from_pem(pem)
    if args.out:
        Path(args.out).write_text(pem)
        print(f"wrote the audit public key to {args.out} (fingerprint {key.fingerprint})")
    else:
        print(pem, end="")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    """The whole chain, every signature and the signed head, checked here (offline after the download)."""
    if args.task:
        print("verify checks the whole chain; it cannot be combined with --task", file=sys.stderr)
        return 2
    trusted = _trusted_key(args.public_key)
    with _client(args) as client:
        served = client.audit_head()  # before the events: events appended meanwhile are fine
        events = client.audit_events()
    served_key = AuditPublicKey.from_pem(served.public_key)
    key = trusted or served_key
    if trusted is not None and trusted != served_key:
        print(
            f"WARNING: the server presents another audit key ({served_key.fingerprint[:16]}…) than the trusted "
            f"one ({trusted.fingerprint[:16]}…)",
            file=sys.stderr,
        )
    head, source = head_from_message(served), "GetAuditHead"
    if args.head:
        head, fingerprint = read_head_file(Path(args.head))
        source = args.head
        if fingerprint != key.fingerprint:
            print(f"AUDIT CHAIN BROKEN: the head file {args.head} was signed by another key", file=sys.stderr)
            return 1
    report = verify_audit(events, public_key=key, head=head)
    if not report.ok:
        where = f"at seq {report.first_bad_seq}" if report.first_bad_seq is not None else "at the head"
        print(f"AUDIT CHAIN BROKEN {where}: {report.reason}", file=sys.stderr)
        return 1
    tampered = warnings_in(events)
    for warning in tampered:
        # The chain verifies, but the server itself found, at a start, that the database had lost or
        # changed events since it last published its head (see docs/operations.md).
        print(f"AUDIT TRAIL TAMPERED: the server recorded a mismatch of its published head: {warning}", file=sys.stderr)
    if tampered:
        return 1
    print(
        f"audit chain intact: {report.reason}; signed head seq {head.seq} ({head.hash[:16]}…, from {source}), "
        f"key {key.fingerprint[:16]}…"
    )
    if trusted is None:
        print(
            "note: checked with the key the server presents; pass --public-key with a copy obtained elsewhere so "
            "that a server whose key was replaced cannot pass",
            file=sys.stderr,
        )
    return 0


def cmd_proof(args: argparse.Namespace) -> int:
    """``lethe proof TASK | --request JOB_ID [--out FILE]`` and ``lethe proof verify FILE [--public-key FILE]``."""
    words = list(args.words)
    if len(words) == 2 and words[0] == "verify":
        return _proof_verify(Path(words[1]), _trusted_key(args.public_key))
    task = args.task or (words[0] if len(words) == 1 else "")
    if len(words) > 1 or bool(task) == bool(args.request):
        print("usage: lethe proof TASK | --request JOB_ID [--out FILE], or lethe proof verify FILE", file=sys.stderr)
        return 2
    with _client(args) as client:
        certificate = client.forgetting_certificate(task=task, job_id=args.request or "")
    data = certificate_file(certificate)
    if not args.out:
        sys.stdout.write(data.decode())
        return 0
    Path(args.out).write_bytes(data)
    document = json.loads(certificate.document)
    print(document.get("summary", ""))
    print(f"wrote the signed certificate to {args.out}; check it with: lethe proof verify {args.out} --public-key KEY")
    return 0


def _proof_verify(path: Path, trusted: AuditPublicKey | None) -> int:
    check = verify_certificate(path.read_bytes(), trusted)
    if not check.ok:
        print(f"CERTIFICATE INVALID: {check.reason}", file=sys.stderr)
        for problem in check.event_problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"certificate valid: {check.reason}")
    print(f"key fingerprint {check.fingerprint}")
    print(check.certificate.get("summary", ""))
    if not check.origin_verified:
        print("note: integrity only, not origin: verified against the key embedded in the file", file=sys.stderr)
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model()
    print(
        json.dumps(
            {
                "strategy": info.strategy,
                "backbone": info.backbone,
                "version": info.version,
                "input_shape": list(info.input_shape),
                "num_classes": info.num_classes,
                "parameters": info.parameters,
                "task_incremental": info.task_incremental,
                "unlearn_methods": list(info.unlearn_methods),
                "device": info.device,
                "config": dict(info.config),
            },
            indent=2,
        )
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``lethe export [--task T] --format F --out FILE``: the network Predict serves, checked and written atomically."""
    with _client(args) as client:
        try:
            result = client.export(args.task or None, args.format, args.out)
        except ExportError as exc:
            print(f"lethe: {exc}", file=sys.stderr)
            return 1
    print(
        f"wrote {result.path}: {result.bytes} bytes, sha256 {result.sha256}, model version {result.model_version}, "
        f"{result.format}, input [n, {', '.join(map(str, result.input_shape))}]"
    )
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    import hashlib
    import secrets

    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    allowed = ("predict", "learn", "unlearn", "admin")
    bad = [s for s in scopes if s not in allowed]
    if not scopes or bad:
        print(f"--scopes: choose from {', '.join(allowed)}", file=sys.stderr)
        return 2
    token = "lethe_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token (shown once, give it to {args.principal}): {token}")
    print("add to [auth] tokens in the server config:")
    print(f'  "{args.principal}:{digest}:{"+".join(scopes)}"')
    return 0


def _server_side(args: argparse.Namespace) -> int:
    try:
        from server import main as server_main
    except ImportError as exc:  # the client-only install
        print(f"'lethe {args.command}' needs the server extra (pip install 'lethe[server]'): {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return server_main.serve(args)
    return server_main.db_command(args)


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("LETHE_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT[,HOST:PORT...]",
        help=f"the Lethe server, or several: primary, standbys, replicas (env LETHE_SERVER; default {DEFAULT_SERVER})",
    )
    parser.add_argument("--token", default=os.environ.get("LETHE_TOKEN"), help="bearer token (env LETHE_TOKEN)")
    parser.add_argument("--ca", help="PEM CA certificate of the server (enables TLS)")
    parser.add_argument("--cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--key", help="PEM client private key (mutual TLS)")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", help="digits, a .npz file, CIFAR batches or an image folder")
    parser.add_argument("--classes", help="only these classes, e.g. 0,1 or 0-4")
    parser.add_argument("--permute", type=int, help="apply the fixed pixel permutation with this seed")


def build_parser() -> argparse.ArgumentParser:
    """The whole ``lethe`` argument parser."""
    parser = argparse.ArgumentParser(prog="lethe", description="Lethe: continual learning and unlearning server.")
    sub = parser.add_subparsers(dest="command", required=True)
    try:
        from server.main import add_db_arguments, add_serve_arguments
    except ImportError:
        add_serve_arguments = add_db_arguments = None  # type: ignore[assignment]
    serve = sub.add_parser("serve", help="run the daemon")
    db = sub.add_parser("db", help="database maintenance: upgrade, verify-audit")
    if add_serve_arguments is not None and add_db_arguments is not None:
        add_serve_arguments(serve)
        add_db_arguments(db)
    serve.set_defaults(func=_server_side)
    db.set_defaults(func=_server_side)

    learn = sub.add_parser("learn", help="stream a dataset as a new task")
    learn.add_argument("task", help="name of the new task (letters, digits, '.', '_', '-'; never reused)")
    _add_data_options(learn)
    learn.add_argument("--epochs", type=int, default=0, help="training epochs (0 = the server's default)")
    learn.add_argument("--batch-size", type=int, default=0, help="training batch size (0 = the server's default)")
    learn.add_argument("--lr", type=float, default=0.0, help="learning rate (0 = the server's default)")
    learn.add_argument("--idempotency-key", help="resending with the same key returns the same job (default: random)")
    learn.add_argument("--ids", metavar="FILE", help="sample ids, one per line in stream order (default: server-made)")
    learn.add_argument(
        "--temporary",
        action="store_true",
        help="learn into an exactly forgettable side network until 'lethe commit' (CLPU temporary learning)",
    )
    learn.add_argument(
        "--ttl",
        type=int,
        default=0,
        metavar="SECONDS",
        help="with --temporary: unlearn the task if not committed within SECONDS (0 = the server's default)",
    )
    learn.add_argument("--no-wait", action="store_true", help="return once the job is queued")
    learn.add_argument("--progress", action="store_true", help="show progress bars even when not on a terminal")
    learn.set_defaults(func=cmd_learn)

    unlearn = sub.add_parser("unlearn", help="forget a task, or a person's samples (right to be forgotten)")
    unlearn.add_argument("task", nargs="?", default="", help="the task; with --ids: only there (empty = every task)")
    unlearn.add_argument("--ids", nargs="+", metavar="FILE|ID", help="forget these samples (files: one id per line)")
    unlearn.add_argument("--reason", default="", help="why (recorded in the audit trail), e.g. a request number")
    unlearn.add_argument("--method", default="", help="unlearning method (default: the strategy's; see 'lethe model')")
    unlearn.add_argument("--idempotency-key", help="resending with the same key returns the same job (default: random)")
    unlearn.add_argument("--no-wait", action="store_true", help="return once the job is queued")
    unlearn.add_argument("--progress", action="store_true", help="show a progress bar even when not on a terminal")
    unlearn.set_defaults(func=cmd_unlearn)

    commit = sub.add_parser("commit", help="merge a temporary task into the model (distillation of its side network)")
    commit.add_argument("task", help="a TEMPORARY task")
    commit.add_argument("--idempotency-key", help="resending with the same key returns the same job (default: random)")
    commit.add_argument("--no-wait", action="store_true", help="return once the job is queued")
    commit.add_argument("--progress", action="store_true", help="show a progress bar even when not on a terminal")
    commit.set_defaults(func=cmd_commit)

    locate = sub.add_parser("locate", help="which tasks hold these sample ids (admin)")
    locate.add_argument("--ids", nargs="+", required=True, metavar="FILE|ID", help="files (one id per line) or ids")
    locate.set_defaults(func=cmd_locate)

    predict = sub.add_parser("predict", help="predict a dataset and report accuracy")
    predict.add_argument("task", nargs="?", default="", help="the task (task-incremental models; omit for lure)")
    _add_data_options(predict)
    predict.add_argument("--limit", type=int, default=1000, help="predict at most this many samples (default 1000)")
    predict.add_argument("--show", type=int, default=0, help="print the first N predictions")
    predict.add_argument("--allow-unlearned", action="store_true", help="audit an unlearned task (admin)")
    predict.set_defaults(func=cmd_predict)

    for name, func, help_ in (("tasks", cmd_tasks, "list tasks"), ("model", cmd_model, "describe the model")):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
    jobs = sub.add_parser("jobs", help="list jobs (id first), or show one by its id")
    jobs.add_argument("id", nargs="?", help="the job id (32 hex characters) to show")
    jobs.add_argument("--limit", type=int, default=100, help="list at most this many jobs, oldest first (default 100)")
    jobs.add_argument("--wait", action="store_true", help="with an id: follow the job until it ends")
    jobs.add_argument("--progress", action="store_true", help="with --wait: a progress bar even when not on a terminal")
    jobs.set_defaults(func=cmd_jobs)
    cancel = sub.add_parser(
        "cancel", help="cancel a queued job or a running learn and show it (an unlearn needs the admin scope)"
    )
    cancel.add_argument("id", help="the job id (as 'lethe jobs' lists it)")
    cancel.set_defaults(func=cmd_cancel)
    audit = sub.add_parser(
        "audit",
        help="show the audit trail; 'verify' checks its chain, signatures and signed head; 'public-key' exports "
        "the key",
    )
    audit.add_argument(
        "action", nargs="?", choices=("verify", "public-key"), help="verify the trail, or export the public key"
    )
    audit.add_argument("--verify", action="store_true", help="the same as 'lethe audit verify'")
    audit.add_argument("--public-key", help="verify: the server's audit public key (PEM) from a trusted source")
    audit.add_argument("--head", help="verify: a copy of the server's audit-head.json instead of GetAuditHead")
    audit.add_argument("--out", help="public-key: write the key to this file")
    audit.add_argument("--task", help="list: only the events of this task")
    audit.set_defaults(func=cmd_audit)
    proof = sub.add_parser(
        "proof",
        help="a signed forgetting certificate: 'proof TASK', 'proof --request JOB_ID', 'proof verify FILE' (admin)",
    )
    proof.add_argument(
        "words", nargs="*", metavar="TASK | verify FILE", help="the unlearned task, or 'verify' and a certificate file"
    )
    proof.add_argument("--task", help="the unlearned task (when its name is 'verify')")
    proof.add_argument("--request", metavar="JOB_ID", help="the unlearn job")
    proof.add_argument("--out", help="write the certificate to this file (default: print it)")
    proof.add_argument("--public-key", help="verify: the server's audit public key (PEM) from a trusted source")
    proof.set_defaults(func=cmd_proof)
    token = sub.add_parser("token", help="create a bearer token: prints it once and its config line")
    token.add_argument("action", choices=("create",), help="create: a new random token")
    token.add_argument("--principal", required=True, help="who the token is for (written on every audit event)")
    token.add_argument("--scopes", required=True, help="comma-separated: predict, learn, unlearn, admin")
    token.set_defaults(func=cmd_token)
    export = sub.add_parser("export", help="write the network Predict serves for a task to a file (admin, audited)")
    export.add_argument(
        "--task",
        default="",
        metavar="T",
        help="the task (task-incremental strategies); leave out for class-incremental ones",
    )
    export.add_argument(
        "--format",
        required=True,
        choices=EXPORT_FORMATS,
        help="onnx (onnxruntime, Triton), torchscript (torch.jit.load) or safetensors (weights only: needs the "
        "architecture)",
    )
    export.add_argument(
        "--out", required=True, type=Path, metavar="FILE", help="the file to write (replaced atomically when complete)"
    )
    export.set_defaults(func=cmd_export)
    _add_client_options(export)
    clients = (learn, unlearn, commit, locate, predict, jobs, cancel, audit, proof)
    for p in (*clients, sub.choices["tasks"], sub.choices["model"]):
        _add_client_options(p)

    from client.report import cmd_report  # matplotlib is imported only when a report is written

    report = sub.add_parser("report", help="write an HTML report: accuracy, spill, relapse, unlearn proofs (admin)")
    report.add_argument("--out", required=True, type=Path, help="directory for report.html and its PNG plots")
    _add_client_options(report)
    report.set_defaults(func=lambda args: cmd_report(_client(args), args.out, args.server))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lethe`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LetheError as exc:
        _error(describe_error(exc, args))
        return 1
    except JobFailedError as exc:
        _error(str(exc))
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as exc:
        _error(str(exc))
        return 2
    except Exception as exc:  # never a traceback; say what it was
        _error(f"unexpected error: {type(exc).__name__}: {exc}")
        return 1


def _error(message: str) -> None:
    """One line on stderr."""
    print("lethe: " + " ".join(message.split()), file=sys.stderr)


def describe_error(error: LetheError, args: argparse.Namespace) -> str:
    """``CODE: message`` of a failed call, with a hint where the user can act on it."""
    code, message = error.code.name, error.message
    server = getattr(args, "server", DEFAULT_SERVER)
    if isinstance(error, (UnavailableError, DeadlineExceededError)) and error.reason is None:
        # No ErrorInfo: the server itself never answered (refused, unknown host, TLS mismatch, timeout).
        return (
            f"{code}: cannot reach a Lethe server at {server} ({message}); give its address with "
            "--server HOST:PORT or LETHE_SERVER (and --ca if it uses TLS)"
        )
    if isinstance(error, UnauthenticatedError):
        sent = "the token given was refused" if getattr(args, "token", None) else "no token was given"
        return f"{code}: {message} ({sent}); pass a valid token with --token TOKEN or LETHE_TOKEN"
    if isinstance(error, PermissionDeniedError):
        return f"{code}: {message}; use a token that holds that scope (or admin)"
    if isinstance(error, InvalidArgumentError) and error.field_violations:
        return f"{code}: " + "; ".join(f"{field}: {description}" for field, description in error.field_violations)
    if error.retry_after is not None and error.reason is not None:
        return f"{code}: {message} (retry in {error.retry_after:g} s)"
    return f"{code}: {message}"


if __name__ == "__main__":
    sys.exit(main())

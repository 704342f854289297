"""``lethe serve`` and ``lethe db``: the daemon's command line (``python -m server`` == ``lethe serve``)."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from server.config import Config, ConfigError, load_config, to_toml
from server.logs import configure_logging

log = logging.getLogger("server")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``lethe serve`` (DESIGN.md command line)."""
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--host", help="address to listen on (server.host)")
    parser.add_argument("--port", type=int, help="gRPC port; 0 picks a free one and prints it (server.port)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port; -1 disables (server.metrics_port)")
    parser.add_argument("--data-dir", help="data directory (storage.data_dir)")
    parser.add_argument("--database-url", help="sqlite:///... or postgresql://... (storage.database_url)")
    parser.add_argument("--strategy", help="finetune, uncle or lure (model.strategy)")
    parser.add_argument("--backbone", help="mlp, cnn, resnet18 or resnet50 (model.backbone)")
    parser.add_argument("--input-shape", help="shape of one sample, e.g. 1,8,8 (model.input_shape)")
    parser.add_argument("--num-classes", type=int, help="number of classes (model.num_classes)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (model.device)")
    parser.add_argument(
        "--role", help="primary (default) or replica: Predict only, from the primary's models (server.role)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any setting, e.g. model.options.beta=0.1"
    )
    parser.add_argument("--no-auth", action="store_true", help="disable authentication (loudly logged)")
    parser.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")


_FLAG_KEYS = {
    "host": "server.host",
    "port": "server.port",
    "metrics_port": "server.metrics_port",
    "data_dir": "storage.data_dir",
    "database_url": "storage.database_url",
    "strategy": "model.strategy",
    "backbone": "model.backbone",
    "input_shape": "model.input_shape",
    "num_classes": "model.num_classes",
    "device": "model.device",
    "role": "server.role",
}


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the configuration from parsed ``serve`` flags (raises ConfigError listing every problem)."""
    overrides: dict[str, Any] = {}
    problems = []
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"--set {item!r}: expected KEY=VALUE")
            continue
        overrides[key.strip()] = value.strip()
    if problems:
        raise ConfigError(problems)
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr)
        if value is not None:
            overrides[key] = value
    if args.no_auth:
        overrides["auth.enabled"] = False
    return load_config(args.config, overrides=overrides)


def serve(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM or SIGINT; return the exit code."""
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    busy = _busy_address(config)
    if busy is not None:  # before the slow start (torch, the model), and in one line
        print(busy, file=sys.stderr)
        return 2
    configure_logging(config.telemetry.log_format, config.telemetry.log_level)
    from server.app import App  # heavy imports (torch) only when serving
    from server.jobs import StateMismatchError
    from server.lease import LeaseHeldError
    from server.storage import SchemaError

    app = App(config)
    try:
        ports = app.start()
    except (SchemaError, StateMismatchError, LeaseHeldError, ValueError) as exc:
        print(f"lethe: {exc}", file=sys.stderr)
        app.stop(0)
        return 2
    except (RuntimeError, OSError) as exc:
        if not _is_bind_failure(exc):
            raise
        # Taken between the check above and the bind.
        reason = str(exc).split(";")[0]  # gRPC adds advice on its debug logging
        print(f"lethe: {reason}; stop what holds it or choose another port (--port, --metrics-port)", file=sys.stderr)
        app.stop(0)
        return 2
    print(f"lethe listening on {config.server.host}:{ports.grpc}", flush=True)
    if ports.metrics is not None:
        print(f"metrics on http://{config.server.metrics_host}:{ports.metrics}/metrics", flush=True)
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)  # no locks here: the handler may interrupt the main thread anywhere

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Poll instead of blocking on an Event: the kernel may deliver the signal to another thread
    # (a worker in torch, a gRPC thread), which does not wake a main thread blocked on a lock, and
    # Python runs handlers only in the main thread. A short sleep lets the handler run within
    # 0.2 s wherever the signal landed. (A blocking wait hung a CI run for over a minute.)
    while not received and not app.stopped.is_set():
        time.sleep(0.2)
    if not received:  # the server stopped itself: its lease was taken over (or the takeover failed)
        app.stopped.wait()
        return 3
    log.info("received signal %d: shutting down", received[0])
    app.stop()
    return 0


def _busy_address(config: Config) -> str | None:
    """The one-line refusal when the gRPC or metrics address is held by another process, else None."""
    s = config.server
    for host, port, flag in ((s.host, s.port, "--port"), (s.metrics_host, s.metrics_port, "--metrics-port")):
        if port > 0 and _in_use(host, port):
            return (
                f"lethe: cannot listen on {host}:{port}: the address is already in use (another lethe serve?); "
                f"stop what holds it or choose another port with {flag} (0 picks a free one)"
            )
    return None


def _in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because something already listens there."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False  # an unresolvable host: the server reports it
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As the servers do: a port in TIME_WAIT is free to listen on again.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def _is_bind_failure(exc: BaseException) -> bool:
    """gRPC's "cannot listen on" / "Failed to bind" RuntimeError, or EADDRINUSE from the metrics server."""
    if isinstance(exc, OSError):
        return exc.errno == errno.EADDRINUSE
    return str(exc).startswith(("cannot listen on", "Failed to bind"))


def db_command(args: argparse.Namespace) -> int:
    """``lethe db upgrade`` / ``lethe db verify-audit``."""
    from server.storage import AuditLog, make_engine, make_session_factory, mask_url, upgrade

    try:
        config = load_config(
            args.config, overrides={"storage.database_url": args.database_url} if args.database_url else {}
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    url = config.database_url
    if args.db_command == "upgrade":
        upgrade(url)
        print(f"database {mask_url(url)} is at the newest schema")
        return 0
    from protos.audit_signing import AuditPublicKey
    from server.audit_head import read_head_file

    public_key = AuditPublicKey.from_pem(Path(args.public_key).read_bytes()) if args.public_key else None
    published = read_head_file(Path(args.head_file)).head if args.head_file else None
    sessions = make_session_factory(make_engine(url))
    with sessions() as session:
        result = AuditLog().verify(session, public_key=public_key, published=published)
    if result.ok:
        print(f"audit chain intact: {result.reason}")
        if public_key is None:
            print(
                "note: hashes only; pass --public-key (and --head-file) to detect a rewritten suffix whose hashes "
                "were recomputed, and deleted newest events",
                file=sys.stderr,
            )
        return 0
    print(f"AUDIT CHAIN BROKEN at seq {result.first_bad_seq}: {result.reason}", file=sys.stderr)
    return 1


def add_db_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``lethe db``."""
    parser.add_argument(
        "db_command",
        choices=("upgrade", "verify-audit"),
        help="upgrade: migrate the schema to the newest; verify-audit: check the audit chain in the database",
    )
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--database-url", help="database URL (default: the configuration's)")
    parser.add_argument("--public-key", help="verify-audit: the audit public key (PEM): checks every signature")
    parser.add_argument("--head-file", help="verify-audit: a copy of audit-head.json: detects deleted newest events")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server [serve flags]``."""
    parser = argparse.ArgumentParser(prog="python -m server", description="Run the Lethe daemon.")
    add_serve_arguments(parser)
    return serve(parser.parse_args(argv))

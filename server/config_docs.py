"""Generates ``docs/configuration.md`` from the configuration dataclasses in :mod:`server.config`.

Every section, key, type, default and environment variable comes from the dataclasses; each key's
description is its ``#:`` comment (or trailing ``#`` comment) in ``server/config.py``, else the
entry in :data:`NOTES`. ``tests/ops/test_config_docs.py`` fails when the committed file drifts.

Usage::

    python -m server.config_docs              # write docs/configuration.md
    python -m server.config_docs --check      # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from server import config as config_module
from server.config import Config
from server.engine.registry import STRATEGIES, strategy_options

#: Descriptions of keys that have no comment in ``server/config.py`` (a comment there wins).
NOTES: dict[str, str] = {
    "server.host": "Address the gRPC server listens on; `0.0.0.0` for all interfaces (the container image sets it).",
    "server.metrics_host": "Address of the Prometheus endpoint (`/metrics`).",
    "server.threads": (
        "Threads for the edge's blocking work (SQL, spool writes, forward passes); the gRPC server itself is "
        "asyncio, so open streams hold none. Also sets per-method limits of calls in flight: `threads` Learn "
        "streams, 64 x `threads` WatchJob and PredictStream streams, 2 exports (see operations.md, The gRPC edge)."
    ),
    "server.grace_seconds": (
        "On SIGTERM: seconds in-flight RPCs and the running job get to finish; a job still running after it "
        "is re-queued and runs again after the restart."
    ),
    "server.max_message_bytes": "Largest gRPC message accepted or sent (one Learn chunk, one Predict request).",
    "server.tls_key": "PEM private key of `tls_cert`; set both to enable TLS.",
    "server.tls_client_ca": (
        "PEM CA bundle: enables mutual TLS; clients must present a certificate signed by it (needs `tls_cert`)."
    ),
    "storage.data_dir": (
        "Directory of the SQLite database (by default), spool, probe, member and retained data files and "
        "checkpoints. Back it up together with the database."
    ),
    "storage.database_url": "`sqlite:///path` or `postgresql://user:password@host/db`; empty = `<data_dir>/lethe.db`.",
    "model.strategy": "`uncle`, `lure`, `agscl` or `finetune` (see README, Strategies).",
    "model.backbone": "`mlp`, `cnn`, `resnet18` or `resnet50`.",
    "model.input_shape": "Shape of one sample, e.g. `[1, 8, 8]` or `[3, 32, 32]` (`1,8,8` in env and flags).",
    "model.num_classes": "Number of classes (output units), 2 to 100000.",
    "model.device": "`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.",
    "model.seed": "Seed of initialization, data splits and sampling: on CPU the same configuration, seed and "
    "request sequence give a bit-identical model on a given machine and thread count (see operations.md, "
    "Reproducibility).",
    "model.cifar_stem": "ResNet backbones: 3x3 stride-1 first convolution and no max-pool, for small images.",
    "model.width": "Hidden width of the `mlp`/`cnn` backbones (0 = the backbone's default).",
    "model.options": (
        "Strategy options, a table `[model.options]`, passed to the strategy's builder; an unknown option "
        "is refused at start-up with the list of allowed ones. Set one with `--set model.options.NAME=VALUE`."
    ),
    "training.epochs": (
        "Epochs per Learn when its header leaves `epochs` at 0; 0 = the strategy's own default "
        "(uncle, agscl, finetune: 20; lure: `model.options.epochs`, 10)."
    ),
    "training.batch_size": (
        "Batch size when the Learn header leaves it at 0; 0 = the strategy's own default "
        "(uncle, agscl, finetune: 32; lure: `model.options.batch_size`, 64)."
    ),
    "training.holdout_fraction": (
        "Share of each Learn stream held out as the task's probe set (never trained on), in (0, 1)."
    ),
    "training.max_probe_samples": "Cap on a task's probe set (and on its member set, used for the MIA score).",
    "limits.max_stream_bytes": "Largest Learn stream in bytes on the wire.",
    "limits.max_stream_samples": "Most samples in one Learn stream.",
    "limits.max_queued_jobs": "Most jobs waiting in the queue; beyond it Learn and Unlearn get RESOURCE_EXHAUSTED.",
    "limits.max_tasks": "Most tasks the server keeps (in any state).",
    "limits.max_predict_samples": "Most samples in one Predict request.",
    "limits.max_temporary_tasks": (
        "Most tasks held by side networks at once (TEMPORARY learns, queued or done, not yet committed or "
        "unlearned); beyond it a TEMPORARY Learn gets RESOURCE_EXHAUSTED (`TEMPORARY_TASK_LIMIT`)."
    ),
    "limits.temporary_ttl_seconds": (
        "Default time to live of a TEMPORARY task, counted from the end of its learn: when it passes and the "
        "task was not committed, the server unlearns it (principal `system:ttl`, audited as any unlearn). A "
        "Learn's `ttl_seconds` overrides it; 0 here and there = never."
    ),
    "auth.enabled": "Require bearer tokens (`--no-auth` turns it off, with a loud log line).",
    "auth.tokens": (
        "Token entries `principal:<sha256 hex>:scope+scope` as printed by `lethe token create`; scopes `predict`, "
        "`learn`, `unlearn`, `admin`. In env and flags: comma-separated."
    ),
    "telemetry.max_task_series": "Most tasks given their own Prometheus series (accuracy, relapse); 0 = none.",
    "telemetry.log_format": "`json` (one object per line) or `text`.",
    "telemetry.log_level": "`DEBUG`, `INFO`, `WARNING` or `ERROR`.",
}

#: Flags of ``lethe serve`` that set a key directly (any key can be set with ``--set key=value``).
FLAGS: dict[str, str] = {
    "server.host": "--host",
    "server.port": "--port",
    "server.metrics_port": "--metrics-port",
    "storage.data_dir": "--data-dir",
    "storage.database_url": "--database-url",
    "model.strategy": "--strategy",
    "model.backbone": "--backbone",
    "model.input_shape": "--input-shape",
    "model.num_classes": "--num-classes",
    "model.device": "--device",
    "auth.enabled": "--no-auth",
}

#: Short environment variables accepted besides ``LETHE_<SECTION>_<KEY>``.
SHORT_ENV = {"storage.database_url": "LETHE_DATABASE_URL", "storage.data_dir": "LETHE_DATA_DIR"}

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


@dataclasses.dataclass(frozen=True)
class Key:
    """One documented setting."""

    section: str
    name: str
    type: str
    default: str
    env: str
    flag: str
    description: str


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """``(class name, field name) -> comment`` for annotated fields of the classes in ``source``.

    A field's comment is the block of ``#:`` lines just above it, else a trailing ``# ...`` on its line.
    """
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string
    lines = source.splitlines()
    found: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            block: list[str] = []
            line = item.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#:"):
                block.insert(0, lines[line - 1].strip()[2:].strip())
                line -= 1
            text = " ".join(block)
            trailing = comments.get(item.lineno, "")
            if not text and trailing and not trailing.startswith("#:"):
                text = trailing.lstrip("#").strip()
            if text:
                found[(node.name, item.target.id)] = text
    return found


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def collect(config: type[Config] = Config) -> list[tuple[str, str, list[Key]]]:
    """``(section, section description, keys)`` for every section of ``config``, in declaration order."""
    comments = field_comments(inspect.getsource(config_module))
    defaults = config()
    sections: list[tuple[str, str, list[Key]]] = []
    for section_field in dataclasses.fields(config):
        section = section_field.name
        value = getattr(defaults, section)
        section_type = type(value)
        keys = []
        for f in dataclasses.fields(section_type):
            dotted = f"{section}.{f.name}"
            env = f"LETHE_{section}_{f.name}".upper()
            if dotted == "model.options":
                env = "-"  # a table: TOML or --set model.options.NAME=VALUE
            elif dotted in SHORT_ENV:
                env = f"{env}, {SHORT_ENV[dotted]}"
            description = comments.get((section_type.__name__, f.name)) or NOTES.get(dotted, "")
            keys.append(
                Key(
                    section=section,
                    name=f.name,
                    type=_type_name(f.type),
                    default=_toml(getattr(value, f.name)),
                    env=env,
                    flag=FLAGS.get(dotted, ""),
                    description=description,
                )
            )
        sections.append((section, inspect.cleandoc(section_type.__doc__ or ""), keys))
    return sections


def _markdown(text: str) -> str:
    """reStructuredText literals (double backquotes) as Markdown code."""
    return text.replace("``", "`")


def _cell(text: str) -> str:
    return _markdown(text).replace("|", "\\|").replace("\n", " ")


def builder_arguments(builder: Callable[..., object]) -> dict[str, str]:
    """Argument name → description, from the ``Args:`` section of a builder's Google-style docstring."""
    described: dict[str, str] = {}
    name = ""
    in_args = False
    for line in (inspect.getdoc(builder) or "").splitlines():
        if line.strip() == "Args:":
            in_args = True
        elif in_args and line and not line.startswith(" "):
            break  # the next section (Returns:, Raises:)
        elif in_args and line.startswith("    ") and not line.startswith("        ") and ":" in line:
            name, text = line.strip().split(":", 1)
            described[name] = text.strip()
        elif in_args and name and line.strip():
            described[name] += " " + line.strip()
    return described


def strategy_sections() -> list[str]:
    """Markdown tables of every strategy's ``model.options``: name, default and description."""
    out = [
        "## Strategy options (`[model.options]`)",
        "",
        "Generated from each strategy's builder (`server/engine/registry.py`). `width` and `cifar_stem` are "
        "set through `model.width` / `model.cifar_stem`.",
        "",
    ]
    for name in STRATEGIES:
        described = builder_arguments(STRATEGIES[name])
        options = {k: v for k, v in strategy_options(name).items() if k not in ("width", "cifar_stem")}
        out += [f"### `{name}`", ""]
        if not options:
            out += ["No options.", ""]
            continue
        out += ["| option | default | description |", "|---|---|---|"]
        out += [f"| `{k}` | `{_cell(repr(v))}` | {_cell(described.get(k, ''))} |" for k, v in options.items()]
        out.append("")
    return out


def render(config: type[Config] = Config) -> str:
    """The whole ``docs/configuration.md``."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m server.config_docs` from server/config.py. Do not edit by hand: "
        "tests/ops/test_config_docs.py fails when this file and the code disagree. -->",
        "",
        "Settings come from, lowest precedence first: the defaults below, a TOML file (`lethe serve --config "
        "FILE`, one table per section), `LETHE_<SECTION>_<KEY>` environment variables, then flags and "
        "`--set section.key=value`. Every value is checked at start-up and all problems are reported at once. "
        "`lethe serve --print-config` prints the effective configuration as TOML.",
        "",
        "Lists (`model.input_shape`, `auth.tokens`) are TOML arrays in the file and comma-separated in "
        "environment variables and `--set`. Booleans accept `true/false`, `1/0`, `yes/no`, `on/off`.",
        "",
    ]
    for section, doc, keys in collect(config):
        out += [f"## `[{section}]`", ""]
        if doc:
            out += [_markdown(doc), ""]
        out += [
            "| key | type | default | environment | flag | description |",
            "|---|---|---|---|---|---|",
        ]
        for k in keys:
            flag = f"`{k.flag}`" if k.flag else ""
            env = ", ".join(f"`{e.strip()}`" for e in k.env.split(",")) if k.env != "-" else "-"
            out.append(
                f"| `{k.name}` | `{_cell(k.type)}` | `{_cell(k.default)}` | {env} | {flag} | {_cell(k.description)} |"
            )
        out.append("")
    out += strategy_sections()
    out += [
        "## Example",
        "",
        "```toml",
        "[server]",
        'host = "0.0.0.0"',
        'tls_cert = "/etc/lethe/server.crt"',
        'tls_key = "/etc/lethe/server.key"',
        "",
        "[storage]",
        'data_dir = "/var/lib/lethe"',
        'database_url = "postgresql://lethe@db.internal/lethe"',
        "",
        "[model]",
        'strategy = "uncle"',
        'backbone = "resnet18"',
        "input_shape = [3, 32, 32]",
        "num_classes = 100",
        "",
        "[model.options]",
        "beta = 0.1",
        "",
        "[auth]",
        'tokens = ["ops:<sha256 printed by lethe token create>:admin"]',
        "```",
        "",
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with ``--check``, verify) the configuration reference."""
    parser = argparse.ArgumentParser(prog="python -m server.config_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from the code")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python -m server.config_docs", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

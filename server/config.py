"""Server configuration: frozen dataclasses filled from defaults, a TOML file, ``LETHE_*`` env and flags.

Precedence, lowest first: defaults, ``--config FILE``, environment, command-line flags and
``--set section.key=value``. Every value is checked and all problems are reported together.

Environment variables are ``LETHE_<SECTION>_<KEY>`` in upper case, e.g. ``LETHE_SERVER_PORT=0`` or
``LETHE_STORAGE_DATABASE_URL=postgresql://...``; ``LETHE_DATABASE_URL`` and ``LETHE_DATA_DIR`` are
accepted as short forms.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlparse


class ConfigError(ValueError):
    """One or more configuration values are invalid; ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


#: The values of ``server.role``.
ROLES = ("primary", "replica")


@dataclass(frozen=True)
class ServerSection:
    """The gRPC listener."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port and prints it
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # 0 picks a free port; -1 disables the Prometheus endpoint
    threads: int = 16
    grace_seconds: float = 10.0
    max_message_bytes: int = 16 * 1024 * 1024
    #: Dynamic batching: concurrent Predict/PredictStream/ModelInfer requests for the same task and model version
    #: are joined into one forward pass of at most this many rows (1 = off). A larger request runs alone.
    max_batch_size: int = 1024
    #: How long a request waits for others to join its batch; 0 = never wait, join only what queued while the
    #: previous pass ran (no added latency). The wait ends early once as many requests as the task's recent
    #: passes joined are there.
    max_batch_delay_ms: float = 0.0
    #: HTTP/2 keepalive: the server pings a connection that has been quiet this long.
    keepalive_time_s: float = 30.0
    #: ... and closes it when the ping is not answered within this time.
    keepalive_timeout_s: float = 10.0
    #: Clients may ping as often as this (faster pings are answered with GOAWAY `too_many_pings`).
    keepalive_min_ping_interval_s: float = 0.5
    #: ``primary`` (learns, unlearns, serves; one per database, others wait as hot standbys) or ``replica``
    #: (Predict only, from the models the primary commits, on the same database and data directory).
    role: str = "primary"
    #: PostgreSQL: seconds the primary may go without renewing its lease before a standby takes over.
    lease_ttl_seconds: float = 10.0
    #: PEM files enabling TLS (both) and mutual TLS (``tls_client_ca`` too: clients must present a
    #: certificate signed by that CA).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""


@dataclass(frozen=True)
class StorageSection:
    """Where state lives. An empty ``database_url`` means SQLite at ``<data_dir>/lethe.db``."""

    data_dir: str = "./var"
    database_url: str = ""
    #: Upgrade an older schema at start-up instead of refusing to start (an empty database is always initialized).
    auto_upgrade: bool = False
    #: Where spools, probe/member/retained sets and checkpoints are kept: empty = the data directory;
    #: ``file:///absolute/path`` = that directory (a volume shared by a primary, its standby and replicas);
    #: ``postgresql`` = chunked rows in the PostgreSQL database of ``database_url`` (needs it to be PostgreSQL),
    #: so servers with different data directories (and no shared volume) serve the same models.
    blob_url: str = ""
    #: HMAC key of sample ids (32 random bytes, created on first start); empty = ``<data_dir>/keys/sample-ids.key``.
    #: Back it up with the database: without it no indexed sample can be found again.
    sample_id_key_file: str = ""


@dataclass(frozen=True)
class ModelSection:
    """The one live model. ``options`` are passed to the strategy's builder as keyword arguments."""

    strategy: str = "uncle"
    backbone: str = "mlp"
    input_shape: tuple[int, ...] = (1, 8, 8)
    num_classes: int = 10
    device: str = "auto"
    seed: int = 0
    cifar_stem: bool = True
    width: int = 0
    #: torch intra-op threads (0 = torch's default, one per core).
    torch_threads: int = 0
    #: torch intra-op threads of a forward pass that Predict, PredictStream or ModelInfer runs on the executor
    #: (0 = ``torch_threads``). Small passes run on the event loop with one thread whatever this says.
    inference_threads: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSection:
    """Defaults for a Learn header's zero fields, and data retention."""

    #: Epochs when a Learn header leaves them at 0; 0 = the strategy's own (uncle, agscl, finetune: 20; lure: 10).
    epochs: int = 0
    #: Batch size when a Learn header leaves it at 0; 0 = the strategy's own (uncle, agscl, finetune: 32; lure: 64).
    batch_size: int = 0
    #: Learning rate when a Learn header leaves it at 0; 0 = the strategy's own
    #: (uncle, agscl, finetune: 1e-3; lure: 0.1).
    learning_rate: float = 0.0
    holdout_fraction: float = 0.1
    max_probe_samples: int = 1000
    #: Operations after an unlearn for which the forgotten task's probe set is kept to measure relapse.
    forget_probe_ops: int = 10
    #: Points the forgotten task's reference (chance, or the never-seen model) may lie outside the 95% interval of
    #: its balanced accuracy, on the probe set and on the member sample, for the forgetting to count as verified.
    forget_tolerance: float = 5.0
    #: Forgetting operations per unlearn, the unlearn itself included: while not verified, the worker asks the
    #: strategy for stronger forgetting (e.g. more burn-in) until this many have run (1 = never ask).
    forget_max_attempts: int = 3
    #: Keep every task's training data (as ``lure`` with replay=full does) for strategies that otherwise
    #: keep none (``uncle``, ``finetune``), so that a person's samples can be forgotten (records-level
    #: unlearning); the data is purged when its task is unlearned.
    retain_training_data: bool = False


@dataclass(frozen=True)
class LimitsSection:
    """Request limits; exceeding one gives RESOURCE_EXHAUSTED."""

    max_stream_bytes: int = 1024 * 1024 * 1024
    max_stream_samples: int = 2_000_000
    max_queued_jobs: int = 100
    max_tasks: int = 10_000
    max_predict_samples: int = 8192
    #: Sample ids one records-level Unlearn may name.
    max_forget_samples: int = 100_000
    #: Tasks held by side networks at once (TEMPORARY, or queued to be); beyond it a TEMPORARY Learn is refused.
    max_temporary_tasks: int = 100
    #: Seconds a TEMPORARY task lives after its learn ends before it is unlearned, unless committed; 0 = forever.
    temporary_ttl_seconds: int = 0


@dataclass(frozen=True)
class AuthSection:
    """Bearer tokens. Each entry of ``tokens`` is ``"<principal>:<sha256 hex>:<scope>[+<scope>...]"``."""

    enabled: bool = True
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class TelemetrySection:
    """Metrics and logs."""

    max_task_series: int = 100
    log_format: str = "json"
    log_level: str = "INFO"


@dataclass(frozen=True)
class AuditSection:
    """The audit trail's Ed25519 signing key (DESIGN.md section 9)."""

    #: PEM file (PKCS#8, unencrypted) of the key that signs every audit event, the chain head and forgetting
    #: certificates. Empty = `<data_dir>/keys/audit-ed25519.pem`, created (mode 0600) on first start; a file named
    #: here must exist (e.g. `openssl genpkey -algorithm ed25519 -out FILE`). Its public key is written to
    #: `<data_dir>/keys/audit-ed25519.pub`. Keep the key: events signed with a lost key verify only with its public key.
    signing_key_file: str = ""
    #: Refused calls (UNAUTHENTICATED, PERMISSION_DENIED) are audited at most this many times a minute; the rest are
    #: counted (``lethe_auth_denied_total``) and summed into the next audited refusal. 0 = never audit them.
    denied_per_minute: int = 10


@dataclass(frozen=True)
class Config:
    """The whole server configuration."""

    server: ServerSection = field(default_factory=ServerSection)
    storage: StorageSection = field(default_factory=StorageSection)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    auth: AuthSection = field(default_factory=AuthSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    audit: AuditSection = field(default_factory=AuditSection)

    @property
    def database_url(self) -> str:
        """The effective database URL (SQLite in the data directory by default)."""
        if self.storage.database_url:
            return self.storage.database_url
        return f"sqlite:///{Path(self.storage.data_dir).resolve() / 'lethe.db'}"

    @property
    def audit_key_file(self) -> Path:
        """The effective audit signing key file (``<data_dir>/keys/audit-ed25519.pem`` by default)."""
        if self.audit.signing_key_file:
            return Path(self.audit.signing_key_file)
        return Path(self.storage.data_dir).resolve() / "keys" / "audit-ed25519.pem"


SCOPES = ("predict", "learn", "unlearn", "admin")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_SHORT_ENV = {"LETHE_DATABASE_URL": "storage.database_url", "LETHE_DATA_DIR": "storage.data_dir"}


def _sections() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _field_types(section_type: type) -> dict[str, Any]:
    hints = get_type_hints(section_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_type)}


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Convert ``value`` (TOML value or string from env/flags) to ``kind``; raise ValueError with a reason."""
    origin = get_origin(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        item = get_args(kind)[0]
        items = [s for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, item, where) for v in items)
    if origin in (Mapping, dict) or kind is Mapping:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if origin in (Union, types.UnionType):
        raise ValueError(f"{where}: unsupported type {kind}")
    return value


def _parse_literal(text: str) -> Any:
    """Parse a ``--set`` value as a TOML literal when it is one, else keep the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build a :class:`Config` from a TOML file, the environment and explicit overrides.

    Args:
        path: optional TOML file with tables named after the sections (``[server]``, ``[model]``, ...).
        env: environment to read ``LETHE_*`` variables from (defaults to ``os.environ``).
        overrides: dotted keys to values, e.g. ``{"server.port": 0, "model.options.beta": 0.1}``; strings
            are parsed like environment values.

    Raises:
        ConfigError: listing every invalid or unknown setting.
    """
    problems: list[str] = []
    raw: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
    sections = _sections()

    def put(dotted: str, value: Any, source: str) -> None:
        parts = dotted.split(".")
        if len(parts) < 2 or parts[0] not in sections:
            problems.append(f"{source}: unknown setting {dotted!r} (sections: {', '.join(sections)})")
            return
        section, key = parts[0], parts[1]
        if section == "model" and key == "options" and len(parts) > 2:
            raw[section].setdefault("options", {})
            raw[section]["options"][".".join(parts[2:])] = value
            return
        if len(parts) != 2 or key not in _field_types(sections[section]):
            allowed = ", ".join(_field_types(sections[section]))
            problems.append(f"{source}: unknown setting {dotted!r} (allowed in [{section}]: {allowed})")
            return
        raw[section][key] = value

    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError([f"config file {path} does not exist"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config file {path}: {exc}"]) from None
        for section, table in data.items():
            if not isinstance(table, dict):
                problems.append(f"{path}: top-level key {section!r} must be a table like [{section}]")
                continue
            for key, value in table.items():
                if section == "model" and key == "options" and isinstance(value, dict):
                    for opt, opt_value in value.items():
                        put(f"model.options.{opt}", opt_value, str(path))
                else:
                    put(f"{section}.{key}", value, str(path))

    environ = os.environ if env is None else env
    for name, value in sorted(environ.items()):
        if not name.startswith("LETHE_"):
            continue
        if name in _SHORT_ENV:
            put(_SHORT_ENV[name], value, name)
            continue
        rest = name[len("LETHE_") :].lower()
        for section in sections:
            if rest.startswith(section + "_"):
                put(f"{section}.{rest[len(section) + 1 :]}", value, name)
                break
        # Other LETHE_* variables (LETHE_SERVER, LETHE_TOKEN, LETHE_TEST_*) belong to the client or tests.

    for dotted, value in (overrides or {}).items():
        if isinstance(value, str) and dotted.startswith("model.options."):
            value = _parse_literal(value)
        put(dotted, value, f"--set {dotted}")

    built: dict[str, Any] = {}
    for section, section_type in sections.items():
        kwargs: dict[str, Any] = {}
        types_ = _field_types(section_type)
        for key, value in raw[section].items():
            if section == "model" and key == "options":
                kwargs[key] = dict(value)
                continue
            try:
                kwargs[key] = _coerce(value, types_[key], f"{section}.{key}")
            except ValueError as exc:
                problems.append(str(exc))
        built[section] = section_type(**kwargs)
    config = Config(**built)
    problems.extend(validate(config))
    if problems:
        raise ConfigError(problems)
    return config


def validate(config: Config) -> list[str]:
    """Return a message for every value out of its allowed range (empty when all is well)."""
    p: list[str] = []
    s, m, t, lim = config.server, config.model, config.training, config.limits
    for name, port in (("server.port", s.port), ("server.metrics_port", s.metrics_port)):
        if not (-1 if name.endswith("metrics_port") else 0) <= port <= 65535:
            p.append(f"{name}: must be in 0..65535 (0 picks a free port), got {port}")
    if s.threads < 1:
        p.append(f"server.threads: must be >= 1, got {s.threads}")
    if s.grace_seconds < 0:
        p.append(f"server.grace_seconds: must be >= 0, got {s.grace_seconds}")
    if not 1 <= s.max_batch_size <= 65_536:
        p.append(f"server.max_batch_size: must be 1 (off) to 65536, got {s.max_batch_size}")
    if not 0 <= s.max_batch_delay_ms <= 1000:
        p.append(f"server.max_batch_delay_ms: must be 0 to 1000, got {s.max_batch_delay_ms}")
    for name in ("keepalive_time_s", "keepalive_timeout_s", "keepalive_min_ping_interval_s"):
        if getattr(s, name) <= 0:
            p.append(f"server.{name}: must be > 0, got {getattr(s, name)}")
    if s.role not in ROLES:
        p.append(f"server.role: must be one of {', '.join(ROLES)}, got {s.role!r}")
    if not 1 <= s.lease_ttl_seconds <= 3600:
        p.append(f"server.lease_ttl_seconds: must be 1 to 3600, got {s.lease_ttl_seconds}")
    if s.max_message_bytes < 1024:
        p.append(f"server.max_message_bytes: must be >= 1024, got {s.max_message_bytes}")
    if bool(s.tls_cert) != bool(s.tls_key):
        p.append("server.tls_cert and server.tls_key: set both to enable TLS, or neither")
    if s.tls_client_ca and not s.tls_cert:
        p.append("server.tls_client_ca: mutual TLS needs server.tls_cert and server.tls_key too")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(s, name)
        if path and not Path(path).is_file():
            p.append(f"server.{name}: file {path} does not exist")
    url = config.storage.database_url
    if url and not url.startswith(("sqlite:", "postgresql", "postgres:")):
        p.append(f"storage.database_url: must start with sqlite:// or postgresql://, got {url.split(':')[0]}://...")
    problem = blob_url_problem(config.storage.blob_url, config.database_url)
    if problem is not None:
        p.append(problem)
    if not m.input_shape or any(d <= 0 for d in m.input_shape) or len(m.input_shape) > 4:
        p.append(f"model.input_shape: 1 to 4 positive dimensions like 1,8,8, got {m.input_shape}")
    if not 2 <= m.num_classes <= 100_000:
        p.append(f"model.num_classes: must be in 2..100000, got {m.num_classes}")
    for name in ("torch_threads", "inference_threads"):
        if not 0 <= getattr(m, name) <= 1024:
            p.append(f"model.{name}: must be 0 (the default) to 1024, got {getattr(m, name)}")
    if m.device != "auto" and m.device != "cpu" and not m.device.startswith("cuda"):
        p.append(f"model.device: auto, cpu, cuda or cuda:N, got {m.device!r}")
    if t.epochs < 0 or t.batch_size < 0:
        p.append(
            f"training.epochs and training.batch_size: must be >= 0 (0 = strategy default), got {t.epochs} and "
            f"{t.batch_size}"
        )
    if t.learning_rate < 0:
        p.append(f"training.learning_rate: must be >= 0 (0 = strategy default), got {t.learning_rate}")
    if not 0 < t.holdout_fraction < 1:
        p.append(f"training.holdout_fraction: must be in (0, 1), got {t.holdout_fraction}")
    if t.max_probe_samples < 1:
        p.append(f"training.max_probe_samples: must be >= 1, got {t.max_probe_samples}")
    if t.forget_probe_ops < 0:
        p.append(f"training.forget_probe_ops: must be >= 0, got {t.forget_probe_ops}")
    if not 0 <= t.forget_tolerance <= 100:
        p.append(f"training.forget_tolerance: must be in [0, 100] points, got {t.forget_tolerance}")
    if not 1 <= t.forget_max_attempts <= 100:
        p.append(f"training.forget_max_attempts: must be in 1..100, got {t.forget_max_attempts}")
    for name in (
        "max_stream_bytes",
        "max_stream_samples",
        "max_queued_jobs",
        "max_tasks",
        "max_predict_samples",
        "max_forget_samples",
        "max_temporary_tasks",
    ):
        if getattr(lim, name) < 1:
            p.append(f"limits.{name}: must be >= 1, got {getattr(lim, name)}")
    if lim.temporary_ttl_seconds < 0:
        p.append(f"limits.temporary_ttl_seconds: must be >= 0 (0 = never expire), got {lim.temporary_ttl_seconds}")
    for i, entry in enumerate(config.auth.tokens):
        problem = token_entry_problem(entry)
        if problem:
            p.append(f"auth.tokens[{i}]: {problem}")
    if config.telemetry.max_task_series < 0:
        p.append(f"telemetry.max_task_series: must be >= 0, got {config.telemetry.max_task_series}")
    if config.telemetry.log_format not in LOG_FORMATS:
        p.append(f"telemetry.log_format: one of {', '.join(LOG_FORMATS)}, got {config.telemetry.log_format!r}")
    key_file = config.audit.signing_key_file
    if key_file and not Path(key_file).is_file():
        p.append(
            f"audit.signing_key_file: file {key_file} does not exist (leave it empty to have the server create "
            "<data_dir>/keys/audit-ed25519.pem, or create one with: openssl genpkey -algorithm ed25519 -out FILE)"
        )
    if config.telemetry.log_level.upper() not in LOG_LEVELS:
        p.append(f"telemetry.log_level: one of {', '.join(LOG_LEVELS)}, got {config.telemetry.log_level!r}")
    return p


def blob_url_problem(url: str, database_url: str) -> str | None:
    """Why ``url`` is not a usable ``storage.blob_url`` with ``database_url``, or None when it is.

    Args:
        url: the configured blob URL.
        database_url: the effective database URL (``storage.database_url``, or SQLite's default).
    """
    if url in ("", "postgresql"):
        if url == "postgresql" and not database_url.startswith(("postgresql", "postgres:")):
            return (
                'storage.blob_url: "postgresql" keeps blobs in the PostgreSQL database, but storage.database_url '
                "is not PostgreSQL (SQLite by default); set a postgresql:// database URL, or use file:///path or "
                "leave blob_url empty (the data directory)"
            )
        return None
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        return (
            f"storage.blob_url: empty (the data directory), file:///absolute/path (a shared volume) or "
            f"postgresql, got {url!r}"
        )
    return None


def token_entry_problem(entry: str) -> str | None:
    """Why a ``principal:sha256:scopes`` token entry is malformed, or None when it is fine."""
    parts = entry.split(":")
    if len(parts) != 3 or not parts[0]:
        return "expected 'principal:<sha256 hex>:scope+scope'"
    digest, scopes = parts[1], parts[2].split("+")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return "the middle part must be a SHA-256 hex digest (64 lowercase hex characters), never the token itself"
    unknown = [sc for sc in scopes if sc not in SCOPES]
    if unknown:
        return f"unknown scope(s) {', '.join(unknown)}; allowed: {', '.join(SCOPES)}"
    return None


def to_toml(config: Config) -> str:
    """Render the effective configuration as TOML (``lethe serve --print-config``)."""
    lines: list[str] = []
    for section in _sections():
        value = getattr(config, section)
        lines.append(f"[{section}]")
        options: Mapping[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if section == "model" and f.name == "options":
                options = item
                continue
            lines.append(f"{f.name} = {_toml_value(item)}")
        if options:
            lines.append("")
            lines.append("[model.options]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in sorted(options.items()))
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

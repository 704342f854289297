"""``lethe report``: a self-contained HTML report built from the accuracy matrix and the audit trail.

The report shows every task's accuracy across the operation sequence (learns and unlearns marked),
the spill of each unlearn, the relapse of each unlearned task, retain and forget accuracy over time,
and one row per unlearn request with its reason, forget accuracy, membership-inference score and the
purge proof (files, bytes and SHA-256 of every deleted file, from the ``data.purged`` audit events).

The plots are PNG files next to ``report.html`` and are also embedded in it (base64), so the HTML
file alone is a complete record. matplotlib (Agg backend, no display) is imported only when a report
is written: the client package itself needs neither it nor torch.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client import LetheClient, pb
from client.audit import verify_chain

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["FIGURE_PIXELS", "ReportData", "UnlearnRecord", "build_report", "cmd_report", "collect", "write_report"]

#: Size of every plot in pixels (width, height).
FIGURE_PIXELS = (1000, 450)
_DPI = 100
REPORT_FILE = "report.html"


@dataclass(frozen=True)
class PurgedFile:
    """One deleted file, as recorded in a ``data.purged`` audit event."""

    path: str
    kind: str
    bytes: int
    sha256: str
    #: ``present`` or ``missing`` when the server read the file at deletion ("" in older events).
    at_deletion: str = ""
    sha256_at_deletion: str = ""

    @property
    def deletion_note(self) -> str:
        """What the server found on disk when it deleted the file, in words."""
        if self.at_deletion == "missing":
            return "already missing"
        if self.at_deletion == "present":
            return "as recorded" if self.sha256_at_deletion == self.sha256 else f"DIFFERS: {self.sha256_at_deletion}"
        return "not recorded"


@dataclass(frozen=True)
class Purge:
    """One ``data.purged`` audit event."""

    seq: int
    at: datetime
    why: str
    job_id: str
    files: tuple[PurgedFile, ...]
    event_hash: str

    @property
    def bytes(self) -> int:
        """Bytes deleted by this purge."""
        return sum(f.bytes for f in self.files)


@dataclass(frozen=True)
class UnlearnRecord:
    """One unlearn request: who asked, why, how it went, and what was deleted."""

    task: str
    job_id: str
    requested_at: datetime
    principal: str
    reason: str
    method: str
    state: str
    metrics: dict[str, float]
    purges: tuple[Purge, ...]
    #: Records-level requests: how many samples, and how many of them each task held (else 0, {}).
    samples: int = 0
    sample_tasks: dict[str, int] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        """What was to be forgotten: the task, or ``N samples (task: count, ...)``."""
        if not self.samples:
            return self.task
        where = ", ".join(f"{t}: {n}" for t, n in sorted(self.sample_tasks.items()))
        return f"{self.samples} samples ({where})"

    def metric(self, name: str) -> float:
        """A job metric, NaN when the job did not report it."""
        return self.metrics.get(name, math.nan)


@dataclass
class ReportData:
    """Everything the report shows, fetched from one server."""

    server: str
    generated_at: datetime
    model: pb.ModelInfo
    evaluations: list[pb.Evaluation]
    tasks: list[pb.Task]
    events: list[pb.AuditEvent]
    unlearns: list[UnlearnRecord] = field(default_factory=list)
    chain_problem: str | None = None

    def task_names(self) -> list[str]:
        """Every task that appears in the accuracy matrix or the registry, in order of first appearance."""
        names: dict[str, None] = {}
        for row in self.evaluations:
            names.setdefault(row.task)
            for name in row.accuracies:
                names.setdefault(name)
        for task in self.tasks:
            names.setdefault(task.name)
        return list(names)


def _at(ts: Any) -> datetime:
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC)


def _kind(row: pb.Evaluation | pb.Job) -> str:
    return str(pb.JobKind.Name(row.kind)).lower()


def _operation(row: pb.Evaluation | pb.Job) -> str:
    """The operation in words: its kind, ``temporary learn`` for a TEMPORARY one (metric ``temporary``)."""
    kind = _kind(row)
    return "temporary learn" if kind == "learn" and row.metrics.get("temporary") == 1.0 else kind


def _letter(row: pb.Evaluation | pb.Job) -> str:
    """L(earn), T(emporary learn), C(ommit) or U(nlearn)."""
    return "T" if _operation(row) == "temporary learn" else _kind(row)[0].upper()


def collect(client: LetheClient, server: str = "") -> ReportData:
    """Fetch the accuracy matrix, tasks, model and audit trail, and join the unlearn requests.

    Needs a token with the ``admin`` scope (the audit trail is admin-only).
    """
    events = client.audit_events()
    data = ReportData(
        server=server,
        generated_at=datetime.now(UTC),
        model=client.model(),
        evaluations=client.evaluations(),
        tasks=client.tasks(),
        events=events,
        chain_problem=verify_chain(events),
    )
    purges: dict[str, list[Purge]] = {}
    for event in events:
        if event.action != "data.purged":
            continue
        details = json.loads(event.details_json or "{}")
        files = tuple(
            PurgedFile(
                str(f.get("path", "")),
                str(f.get("kind", "")),
                int(f.get("bytes", 0)),
                str(f.get("sha256", "")),
                str(f.get("at_deletion", "")),
                str(f.get("sha256_at_deletion") or ""),
            )
            for f in details.get("files", [])
        )
        purge = Purge(event.seq, _at(event.at), str(details.get("why", "")), event.job_id, files, event.hash)
        purges.setdefault(event.task, []).append(purge)
    for event in events:
        if event.action != "unlearn.requested":
            continue
        details = json.loads(event.details_json or "{}")
        job = client.job(event.job_id)
        data.unlearns.append(
            UnlearnRecord(
                task=event.task,
                job_id=event.job_id,
                requested_at=_at(event.at),
                principal=event.principal,
                reason=str(details.get("reason", "")),
                method=str(details.get("method", "")) or job.method,
                state=str(pb.JobState.Name(job.state)).lower(),
                metrics=dict(job.metrics),
                # Purges of the task from its unlearn on: its data, then its probe set after forget_probe_ops;
                # a records request: the files its job rewrote, in every task it touched.
                purges=tuple(
                    p
                    for task_purges in purges.values()
                    for p in task_purges
                    if p.job_id == event.job_id
                    or (p.seq > event.seq and event.task and p in purges.get(event.task, []))
                ),
                samples=int(details.get("samples", 0)),
                sample_tasks={str(k): int(v) for k, v in details.get("tasks", {}).items()},
            )
        )
    return data


# ------------------------------------------------------------------------------------------- plots
def _figure() -> Figure:
    from matplotlib.figure import Figure

    width, height = FIGURE_PIXELS
    return Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _operation_axis(ax: Axes, rows: Sequence[pb.Evaluation]) -> None:
    """x = operation number; learns and unlearns marked with vertical lines and labelled ticks."""
    positions = list(range(1, len(rows) + 1))
    step = max(1, math.ceil(len(rows) / 30))
    ax.set_xticks(positions[::step])
    ax.set_xticklabels(
        [f"{i}\n{_letter(r)} {r.task[:10]}" for i, r in zip(positions, rows, strict=True)][::step],
        fontsize=7,
    )
    for x, row in zip(positions, rows, strict=True):
        if _kind(row) == "unlearn":
            ax.axvline(x, color="tab:red", alpha=0.35, linewidth=2)
        else:
            ax.axvline(x, color="tab:green", alpha=0.2, linewidth=1, linestyle=":")
    ax.set_xlim(0.5, len(rows) + 0.5)
    ax.set_xlabel("operation (L = learn, T = temporary learn, C = commit, U = unlearn; red lines mark unlearns)")


def plot_accuracy(data: ReportData) -> Figure:
    """Every task's probe accuracy after every operation."""
    fig = _figure()
    ax = fig.add_subplot()
    rows = data.evaluations
    if not rows:
        _empty(ax, "no operation has finished yet")
        return fig
    x = list(range(1, len(rows) + 1))
    for task in data.task_names():
        y = [r.accuracies.get(task, math.nan) for r in rows]
        if not all(math.isnan(v) for v in y):
            ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, label=task)
    _operation_axis(ax, rows)
    ax.set_ylim(-2, 102)
    ax.set_ylabel("probe accuracy (%)")
    ax.set_title("Accuracy of every task across the operation sequence")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="task", title_fontsize=8)
    return fig


def plot_retain_forget(data: ReportData) -> Figure:
    """Retain accuracy (learned tasks) and forget accuracy (unlearned tasks) after every operation."""
    fig = _figure()
    ax = fig.add_subplot()
    rows = data.evaluations
    if not rows:
        _empty(ax, "no operation has finished yet")
        return fig
    x = list(range(1, len(rows) + 1))
    for name, label, color in (
        ("retain_accuracy", "RA: mean over learned tasks", "tab:blue"),
        ("forget_accuracy", "FA: mean over unlearned tasks", "tab:red"),
    ):
        y = [r.metrics.get(name, math.nan) for r in rows]
        ax.plot(x, y, marker="o", markersize=4, linewidth=2, label=label, color=color)
    _operation_axis(ax, rows)
    ax.set_ylim(-2, 102)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Retain accuracy (RA) and forget accuracy (FA) over time")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def plot_spill(data: ReportData) -> Figure:
    """The spill of each unlearn: how much the other tasks' accuracies moved."""
    fig = _figure()
    ax = fig.add_subplot()
    rows = [r for r in data.evaluations if _kind(r) == "unlearn" and "spill" in r.metrics]
    if not rows:
        _empty(ax, "no unlearn has been measured yet")
        return fig
    labels = [f"{r.task}\n(v{r.model_version})" for r in rows]
    values = [r.metrics["spill"] for r in rows]
    bars = ax.bar(range(len(rows)), values, color="tab:orange")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("spill (points, summed over other tasks)")
    ax.set_xlabel("unlearned task (model version after the unlearn)")
    ax.set_title("Spill per unlearn: Σ |accuracy change| of the tasks that were not forgotten")
    ax.set_ylim(0, max(1.0, max(values) * 1.25))
    ax.grid(axis="y", alpha=0.3)
    return fig


def relapse_series(data: ReportData) -> dict[str, tuple[list[int], list[float]]]:
    """Per unlearned task: operation numbers from its unlearn on, and |a_unlearn - a_then| in points."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for i, row in enumerate(data.evaluations, start=1):
        if _kind(row) == "unlearn" and row.task in row.accuracies:
            series[row.task] = ([i], [0.0])
            base = row.accuracies[row.task]
            for j, later in enumerate(data.evaluations[i:], start=i + 1):
                if row.task in later.accuracies:
                    series[row.task][0].append(j)
                    series[row.task][1].append(abs(base - later.accuracies[row.task]))
    return series


def plot_relapse(data: ReportData) -> Figure:
    """Relapse of each unlearned task over the operations after its unlearn."""
    fig = _figure()
    ax = fig.add_subplot()
    series = relapse_series(data)
    if not series:
        _empty(ax, "no unlearned task with a probe set yet")
        return fig
    current = {t.name: t.relapse for t in data.tasks}
    for task, (x, y) in series.items():
        now = current.get(task, math.nan)
        label = f"{task} (now {now:.2f})" if not math.isnan(now) else f"{task} (now unknown)"
        ax.plot(x, y, marker="o", markersize=4, linewidth=2, label=label)
    _operation_axis(ax, data.evaluations)
    ax.set_ylim(bottom=0, top=max(5.0, max(max(y) for _, y in series.values()) * 1.25))
    ax.set_ylabel("relapse (points)")
    ax.set_title("Relapse per unlearned task: |accuracy at its unlearn − accuracy now|")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


PLOTS: tuple[tuple[str, str, Callable[[ReportData], Figure]], ...] = (
    ("accuracy.png", "Accuracy of every task after every operation", plot_accuracy),
    ("spill.png", "Spill of each unlearn", plot_spill),
    ("relapse.png", "Relapse of each unlearned task", plot_relapse),
    ("retain_forget.png", "Retain and forget accuracy over time", plot_retain_forget),
)


# -------------------------------------------------------------------------------------------- HTML
def _e(value: object) -> str:
    return html.escape(str(value))


def _num(value: float, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 0.85em; word-break: break-all; } figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; } .bad { color: #b00; font-weight: bold; }
.ok { color: #070; } .muted { color: #666; }
"""


def _tasks_table(data: ReportData) -> list[str]:
    out = [
        "<table><tr><th>task</th><th>state</th><th>samples</th><th>accuracy (%)</th><th>relapse (points)</th>"
        "<th>learned at version</th><th>unlearned at version</th></tr>"
    ]
    for t in data.tasks:
        out.append(
            f"<tr><td>{_e(t.name)}</td><td>{_e(pb.TaskState.Name(t.state).lower())}</td><td class=n>{t.samples}</td>"
            f"<td class=n>{_num(t.accuracy)}</td><td class=n>{_num(t.relapse)}</td>"
            f"<td class=n>{t.learned_version or '–'}</td><td class=n>{t.unlearned_version or '–'}</td></tr>"
        )
    out.append("</table>")
    return out


def _unlearn_table(data: ReportData) -> list[str]:
    if not data.unlearns:
        return ["<p class=muted>No unlearn has been requested.</p>"]
    out = [
        "<table><tr><th>requested</th><th>task</th><th>by</th><th>reason</th><th>method</th><th>state</th>"
        "<th>FA (%)</th><th>MIA (%)</th><th>spill (points)</th><th>UNI</th><th>purged</th></tr>"
    ]
    for u in data.unlearns:
        files = sum(len(p.files) for p in u.purges)
        size = sum(p.bytes for p in u.purges)
        out.append(
            f"<tr><td>{_when(u.requested_at)}</td><td>{_e(u.subject)}</td><td>{_e(u.principal)}</td>"
            f"<td>{_e(u.reason) or '<span class=muted>(none given)</span>'}</td><td>{_e(u.method or 'default')}</td>"
            f"<td>{_e(u.state)}</td><td class=n>{_num(u.metric('forget_accuracy_task'))}</td>"
            f"<td class=n>{_num(u.metric('mia'))}</td><td class=n>{_num(u.metric('spill'))}</td>"
            f"<td class=n>{_num(u.metric('uni'))}</td><td class=n>{_files(files)}, {size:,} bytes</td></tr>"
        )
    out.append("</table>")
    return out


def _purge_proofs(data: ReportData) -> list[str]:
    out: list[str] = []
    for u in data.unlearns:
        out.append(f"<h3>{_e(u.subject)} <span class=muted>(unlearn job <code>{_e(u.job_id)}</code>)</span></h3>")
        if not u.purges:
            out.append("<p class=muted>No data purged yet.</p>")
            continue
        for p in u.purges:
            out.append(
                f"<p>{_when(p.at)}: {_e(p.why)}, {_files(len(p.files))}, {p.bytes:,} bytes "
                f"(audit event {p.seq}, hash <code>{_e(p.event_hash)}</code>)</p>"
            )
            out.append(
                "<table><tr><th>file</th><th>kind</th><th>bytes</th><th>SHA-256</th><th>on disk at deletion</th></tr>"
            )
            for f in p.files:
                out.append(
                    f"<tr><td><code>{_e(f.path)}</code></td><td>{_e(f.kind)}</td><td class=n>{f.bytes:,}</td>"
                    f"<td><code>{_e(f.sha256)}</code></td><td>{_e(f.deletion_note)}</td></tr>"
                )
            out.append("</table>")
    return out or ["<p class=muted>No unlearn has been requested.</p>"]


def _matrix_table(data: ReportData) -> list[str]:
    tasks = data.task_names()
    head = "".join(f"<th>{_e(t)}</th>" for t in tasks)
    out = [f"<table><tr><th>#</th><th>operation</th><th>version</th><th>finished</th>{head}</tr>"]
    for i, row in enumerate(data.evaluations, start=1):
        cells = "".join(f"<td class=n>{_num(row.accuracies[t], 1) if t in row.accuracies else ''}</td>" for t in tasks)
        out.append(
            f"<tr><td class=n>{i}</td><td>{_e(_operation(row))} {_e(row.task)}</td><td class=n>{row.model_version}</td>"
            f"<td>{_when(_at(row.at)) if row.at.seconds else ''}</td>{cells}</tr>"
        )
    out.append("</table>")
    return out


def render_html(data: ReportData, images: Sequence[tuple[str, str, bytes]]) -> str:
    """The report page; ``images`` are ``(file name, caption, PNG bytes)``, embedded as base64."""
    m = data.model
    chain = (
        f"<span class=bad>BROKEN: {_e(data.chain_problem)}</span>"
        if data.chain_problem
        else f"<span class=ok>intact</span> ({len(data.events)} events verified"
        + (f", head <code>{_e(data.events[-1].hash)}</code>)" if data.events else ")")
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Lethe report {_e(data.server)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Lethe report</h1>",
        f"<p class=muted>Generated {_when(data.generated_at)} from {_e(data.server or 'the server')}: "
        f"strategy <b>{_e(m.strategy)}</b>, backbone {_e(m.backbone)}, model version {m.version}, "
        f"{len(data.evaluations)} operations, {len(data.tasks)} tasks.</p>",
        f"<p>Audit chain: {chain}</p>",
        "<h2>Tasks</h2>",
        *_tasks_table(data),
        "<h2>Plots</h2>",
    ]
    for name, caption, png in images:
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{encoded}" alt="{_e(caption)}" '
            f'width="{FIGURE_PIXELS[0]}" height="{FIGURE_PIXELS[1]}">'
            f'<figcaption>{_e(caption)} (<a href="{_e(name)}">{_e(name)}</a>)</figcaption></figure>'
        )
    parts += [
        "<h2>Unlearn requests</h2>",
        "<p class=muted>FA: the forgotten task's probe accuracy right after its unlearn. MIA: membership-inference "
        "attack accuracy on its training samples vs. held-out ones (50 = cannot tell them apart). Spill: summed "
        "accuracy change of the other learned tasks. UNI: uniformity of its predictions (100 = uniform).</p>",
        *_unlearn_table(data),
        "<h2>Purge proofs</h2>",
        "<p class=muted>From the <code>data.purged</code> events of the hash-chained audit trail: every file "
        "deleted for each forgotten task, with its size and SHA-256 digest.</p>",
        *_purge_proofs(data),
        "<h2>Accuracy matrix</h2>",
        *_matrix_table(data),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(data: ReportData, out_dir: Path) -> Path:
    """Draw the plots into ``out_dir`` (PNG) and write ``report.html`` there; return its path.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display, and safe to use off the main thread
    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, str, bytes]] = []
    for name, caption, plot in PLOTS:
        figure = plot(data)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=_DPI)
        png = buffer.getvalue()
        (out_dir / name).write_bytes(png)
        images.append((name, caption, png))
    path = out_dir / REPORT_FILE
    path.write_text(render_html(data, images), encoding="utf-8")
    return path


def build_report(client: LetheClient, out_dir: Path, *, server: str = "") -> Path:
    """Fetch everything from the server and write the report into ``out_dir``; return the HTML's path."""
    return write_report(collect(client, server), out_dir)


def cmd_report(client: LetheClient, out_dir: Path, server: str = "") -> int:
    """``lethe report --out DIR``."""
    with client:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("lethe report needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
        path = build_report(client, out_dir, server=server)
    print(f"wrote {path} ({', '.join(name for name, _, _ in PLOTS)} next to it)")
    return 0

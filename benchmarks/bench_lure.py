"""Benchmarks of the LURE strategy: SNIP overhead and the cost of exact unlearning.

``python -m benchmarks.bench_lure [--quick]``

1. **SNIP importance estimation ÷ training time of the same mega-batch** (goal ≤ 5%): the learn
   metrics ``importance_seconds`` and ``train_seconds`` of every mega-batch that is reset (the second
   on), for the reproduction's configuration (mlp on the digits stream, full replay) and for larger
   ones (the ``cnn``, and ``resnet18`` outside ``--quick``, on random 3×32×32 data).
2. **Exact unlearning of the k-th of n = 8 mega-batches ÷ retraining from scratch on the retained
   data**, for every k (goal: < 1 for every k > 1). Retraining means learning the 7 retained
   mega-batches in a fresh strategy -- the computation whose result exact unlearning reproduces bit
   for bit (checked here for every k). Each k is repeated, interleaved, and the median ratio reported.

Both run the engine in-process (no server: the quantities are engine costs; the reproduction covers
the API). Results go to ``<out>/bench.json``; the plot to ``docs/img/lure-exact-unlearn-cost.png``
and the tables into the ``lure`` section of ``docs/reproduction-lure.md`` (full runs only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import ROOT, machine_summary, write_section
from benchmarks.repro_lure import DOC, TITLE, Settings, make_stream
from server.engine.lure import LureStrategy, build_lure
from server.engine.protocol import LearnOptions, TaskData, no_progress

PLOT = ROOT / "docs" / "img" / "lure-exact-unlearn-cost.png"
#: The section of ``DOC`` this benchmark writes (:func:`benchmarks.report.write_section`).
SECTION = "lure"
#: Goal of the SNIP overhead, as a fraction of the training time of the same mega-batch.
SNIP_GOAL = 0.05


def strategy(backbone: str, input_shape: tuple[int, ...], settings: Settings, seed: int = 0) -> LureStrategy:
    """A lure strategy (SNIP reset, full replay) as the reproduction's servers build it."""
    return build_lure(
        backbone=backbone,
        input_shape=input_shape,
        num_classes=10,
        device=torch.device("cpu"),
        seed=seed,
        width=settings.width if backbone in ("mlp", "cnn") else 0,
        replay="full",
        reset="lure",
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.learning_rate,
    )


def options(settings: Settings) -> LearnOptions:
    """Learn options of every mega-batch."""
    return LearnOptions(epochs=settings.epochs, batch_size=settings.batch_size, learning_rate=settings.learning_rate)


def learn_stream(
    model: LureStrategy, parts: Sequence[TaskData], names: Sequence[str], settings: Settings
) -> list[dict[str, float]]:
    """Learn ``parts`` in order with full replay, as the server would drive it; return each job's metrics."""
    retained: dict[str, TaskData] = {}
    metrics = []
    for name, data in zip(names, parts, strict=True):
        report = model.learn(name, data, options(settings), no_progress, dict(retained))
        assert report.retain is not None
        retained[name] = report.retain
        metrics.append(report.metrics)
    return metrics


def digits_parts(seed: int = 0) -> list[TaskData]:
    """The reproduction's 8 digits mega-batches of ``seed`` as engine task data."""
    stream = make_stream(seed)
    return [
        TaskData(torch.from_numpy(x), torch.from_numpy(y)) for x, y in zip(stream.inputs, stream.labels, strict=True)
    ]


def random_parts(count: int, size: int, shape: tuple[int, ...], seed: int = 0) -> list[TaskData]:
    """``count`` mega-batches of ``size`` random images with random labels."""
    generator = torch.Generator().manual_seed(seed)
    return [
        TaskData(torch.rand((size, *shape), generator=generator), torch.randint(0, 10, (size,), generator=generator))
        for _ in range(count)
    ]


# ----------------------------------------------------------------------------- SNIP overhead


def snip_overhead(case: str, backbone: str, parts: Sequence[TaskData], settings: Settings) -> dict[str, Any]:
    """``importance_seconds / train_seconds`` of every reset mega-batch of a stream."""
    shape = tuple(parts[0].inputs.shape[1:])
    model = strategy(backbone, shape, settings)
    metrics = learn_stream(model, parts, [f"mb{i}" for i in range(len(parts))], settings)
    reset = metrics[1:]
    ratios = [m["importance_seconds"] / m["train_seconds"] for m in reset]
    return {
        "case": case,
        "backbone": backbone,
        "parameters": model.parameter_count(),
        "megabatch_samples": len(parts[0]),
        "epochs": settings.epochs,
        "importance_seconds": [m["importance_seconds"] for m in reset],
        "train_seconds": [m["train_seconds"] for m in reset],
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "max_ratio": max(ratios),
        # The paper trains 50 epochs per mega-batch; the ratio for one epoch is the worst case.
        "per_epoch_ratio": statistics.median(
            m["importance_seconds"] / (m["train_seconds"] / settings.epochs) for m in reset
        ),
    }


# ----------------------------------------------------------------------------- exact unlearning cost


def _states_equal(a: LureStrategy, b: LureStrategy) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def exact_unlearning_cost(settings: Settings, repeats: int) -> dict[str, Any]:
    """Exact unlearning of mega-batch k vs retraining on the other 7, for k = 1..8 (``repeats`` times each)."""
    parts = digits_parts()
    names = [f"mb{i}" for i in range(len(parts))]
    base = strategy("mlp", tuple(parts[0].inputs.shape[1:]), settings)
    learn_metrics = learn_stream(base, parts, names, settings)
    stream_seconds = sum(m["learn_seconds"] for m in learn_metrics)
    state = base.state_dict()
    replay = dict(zip(names, parts, strict=True))  # full replay retains whole mega-batches
    rows = []
    for k in range(1, len(parts) + 1):
        forgotten = names[k - 1]
        unlearn, retrain, identical = [], [], True
        for _ in range(repeats):
            model = strategy("mlp", tuple(parts[0].inputs.shape[1:]), settings)
            model.load_state_dict(state)
            started = time.perf_counter()
            report = model.unlearn(forgotten, "exact", no_progress, replay)
            unlearn.append(time.perf_counter() - started)
            fresh = strategy("mlp", tuple(parts[0].inputs.shape[1:]), settings)
            kept = [i for i in range(len(parts)) if i != k - 1]
            started = time.perf_counter()
            learn_stream(fresh, [parts[i] for i in kept], [names[i] for i in kept], settings)
            retrain.append(time.perf_counter() - started)
            identical = identical and _states_equal(model, fresh)
        ratios = [u / r for u, r in zip(unlearn, retrain, strict=True)]
        rows.append(
            {
                "k": k,
                "replayed_megabatches": int(report.metrics["replayed_megabatches"]),
                "unlearn_seconds": statistics.median(unlearn),
                "retrain_seconds": statistics.median(retrain),
                "ratio": statistics.median(ratios),
                "ratios": ratios,
                "identical_to_retraining": identical,
            }
        )
        print(
            f"exact unlearning of mb{k - 1}: {rows[-1]['unlearn_seconds']:.2f} s vs retraining "
            f"{rows[-1]['retrain_seconds']:.2f} s, ratio {rows[-1]['ratio']:.3f}, identical={identical}",
            flush=True,
        )
    return {"megabatches": len(parts), "repeats": repeats, "stream_seconds": stream_seconds, "rows": rows}


# ----------------------------------------------------------------------------- reporting


def plot_cost(cost: dict[str, Any], path: Path) -> None:
    """Seconds of exact unlearning and of retraining per k, and their ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cost["rows"]
    ks = [r["k"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(ks, [r["unlearn_seconds"] for r in rows], "o-", color="tab:red", label="exact unlearning of mega-batch k")
    left.plot(ks, [r["retrain_seconds"] for r in rows], "s--", color="tab:gray", label="retraining on the other 7")
    left.set_xlabel("k (forgotten mega-batch, 1 = oldest)")
    left.set_ylabel("seconds (median)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot(ks, [r["ratio"] for r in rows], "o-", color="tab:red")
    right.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    right.set_xlabel("k")
    right.set_ylabel("exact unlearning ÷ retraining")
    right.set_ylim(0, max(1.1, max(r["ratio"] for r in rows) * 1.1))
    right.grid(alpha=0.3)
    fig.suptitle(f"LURE exact unlearning cost (n = {cost['megabatches']} mega-batches, mlp, digits, full replay)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(data: dict[str, Any]) -> str:
    """The generated Markdown block of the benchmarks."""
    lines = [
        f"Machine: {data['machine']}; settings `{json.dumps(data['settings'])}`; "
        f"wall time {data['seconds'] / 60:.1f} min.",
        "",
        f"**SNIP importance estimation ÷ training time of the same mega-batch** (goal ≤ {SNIP_GOAL:.0%}; "
        "median and worst over the reset mega-batches)",
        "",
        "| Case | Parameters | Samples per mega-batch | Epochs | Importance (s, median) | Training (s, median) "
        "| Ratio median | Ratio worst | Ratio for one epoch | Goal met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for snip in data["snip"]:
        lines.append(
            f"| {snip['case']} | {snip['parameters']:,} | {snip['megabatch_samples']} | {snip['epochs']} | "
            f"{statistics.median(snip['importance_seconds']):.4f} | {statistics.median(snip['train_seconds']):.3f} | "
            f"{snip['median_ratio']:.2%} | {snip['max_ratio']:.2%} | {snip['per_epoch_ratio']:.2%} | "
            f"{'yes' if snip['max_ratio'] <= SNIP_GOAL else 'no'} |"
        )
    cost = data["exact"]
    lines += [
        "",
        f"**Exact unlearning of the k-th of {cost['megabatches']} mega-batches ÷ retraining from scratch on the "
        f"retained 7** (median of {cost['repeats']} interleaved repetitions; goal < 1 for every k > 1)",
        "",
        "| k | Mega-batches replayed | Exact unlearning (s) | Retraining (s) | Ratio | Goal met | "
        "Same weights as retraining |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in cost["rows"]:
        goal = "—" if row["k"] == 1 else ("yes" if row["ratio"] < 1 else "no")
        lines.append(
            f"| {row['k']} | {row['replayed_megabatches']} | {row['unlearn_seconds']:.2f} | "
            f"{row['retrain_seconds']:.2f} | {row['ratio']:.3f} | {goal} | "
            f"{'bit-identical' if row['identical_to_retraining'] else 'NO'} |"
        )
    lines += ["", "![exact unlearning cost](img/lure-exact-unlearn-cost.png)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; return 0 when they ran (goals are reported, not enforced).

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_lure", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repetitions; results under var/ only")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per mega-batch (default 20; quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per k (default 3; quick 1)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1, as the reproduction)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(epochs=args.epochs or (4 if args.quick else 20), torch_threads=args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    out = ROOT / "var" / ("bench-lure-quick" if args.quick else "bench-lure")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    image = (3, 32, 32)
    big = Settings(epochs=1 if args.quick else 2, batch_size=64, learning_rate=0.05, width=0)
    snip = [snip_overhead("digits, mlp (the reproduction's configuration)", "mlp", digits_parts(), settings)]
    print(json.dumps(snip[-1]), flush=True)
    snip.append(snip_overhead("random 3×32×32, cnn", "cnn", random_parts(2, 256 if args.quick else 1024, image), big))
    print(json.dumps(snip[-1]), flush=True)
    if not args.quick:
        snip.append(snip_overhead("random 3×32×32, resnet18", "resnet18", random_parts(2, 512, image), big))
        print(json.dumps(snip[-1]), flush=True)
    exact = exact_unlearning_cost(settings, repeats)
    data = {
        "settings": {"epochs": settings.epochs, "batch_size": settings.batch_size, "lr": settings.learning_rate},
        "machine": f"{machine_summary()} (shared), torch threads {args.threads}",
        "snip": snip,
        "exact": exact,
        "seconds": time.perf_counter() - started,
    }
    (out / "bench.json").write_text(json.dumps(data, indent=1))
    text = report(data)
    print(text, flush=True)
    plot_path = out / "lure-exact-unlearn-cost.png" if args.quick else PLOT
    plot_cost(exact, plot_path)
    if not args.quick:
        write_section(DOC, SECTION, text, title=TITLE)
    print(f"results: {out / 'bench.json'}; plot: {plot_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Micro-benchmarks of the ``uncle`` strategy, engine level (no server).

``python -m benchmarks.bench_uncle [--quick] [--no-doc]``

1. **Learn step time vs. number of previous tasks**: a strategy that has learned 50 tiny tasks
   against one that has learned 1; both then learn the same new task and every step is timed
   (the ``progress`` callback fires after each optimizer step). Goal: ratio ≤ 1.5, which is what
   the regularization budget is for: each step regularizes at most ``regularized_networks``
   networks' worth of random (task, chunk) pairs of at most K (``max_regularized_tasks``) random
   tasks, so with the default budget of 2 a step generates at most 3 networks' worth of chunks
   (the new task's whole network plus the budget) against 2 with one previous task. Also
   reported for K = 4 and at 32 previous tasks.
2. **Predict with cached generated weights** vs. the same backbone with ordinary weights, batch 64.
   Goal: ≥ 0.9 of the ordinary throughput.
3. **Hypernetwork size**: φ's parameters ÷ the generated network's, for ``resnet18`` (CIFAR-100
   shape), ``cnn`` and ``mlp``; goal ≤ 1 for ``resnet18``. Plus the accuracy cost of chunking:
   uncle on permuted digits with the ``cnn`` backbone at the automatic chunk size and at a 4x
   smaller one, and ResNet-18 itself (CIFAR stem) on one digits task, generated at its automatic
   chunking against the same ResNet-18 with ordinary weights trained the same way (``--only
   resnet18``: minutes of CPU; ResNet-18 on CIFAR needs a GPU run that was not available).

Measurements alternate between the two sides repetition by repetition and report medians, so load
from other processes hits both alike. Results go to the ``bench_uncle`` block of
``docs/reproduction-uncle.md`` and ``var/repro-uncle/bench.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from benchmarks.report import ROOT, machine_line, write_section
from benchmarks.repro_uncle import BENCH_SECTION, DOC, TITLE
from client.datasets import load_digits
from server.engine.backbones import build_backbone
from server.engine.protocol import LearnOptions, TaskData
from server.engine.training import count_minibatches, minibatches, seeded_rng
from server.engine.uncle import UncleStrategy, build_uncle

RAW = ROOT / "var" / "repro-uncle" / "bench.json"
CPU = torch.device("cpu")
DIGITS_SHAPE = (1, 8, 8)


def _no_progress(fraction: float, message: str) -> None:
    """A progress callback that does nothing."""


def _task(index: int, samples: int) -> TaskData:
    """``samples`` digits under pixel permutation ``index``."""
    data = load_digits().permute_pixels(index)
    return TaskData(torch.from_numpy(data.inputs[:samples]), torch.from_numpy(data.labels[:samples]))


def _strategy(previous: int, *, backbone: str = "mlp", **options: Any) -> UncleStrategy:
    """An uncle strategy that has learned ``previous`` tiny tasks (one step each)."""
    strategy = build_uncle(backbone=backbone, input_shape=DIGITS_SHAPE, num_classes=10, device=CPU, seed=0, **options)
    tiny = LearnOptions(epochs=1, batch_size=16, learning_rate=1e-3, seed=0)
    for index in range(previous):
        strategy.learn(f"old{index}", _task(index, 16), tiny, _no_progress, {})
    return strategy


def step_times(strategy: UncleStrategy, task: str, data: TaskData, batch_size: int) -> list[float]:
    """Seconds of each learn step after the first (which includes building the target bank)."""
    stamps: list[float] = []

    def progress(fraction: float, message: str) -> None:
        stamps.append(time.perf_counter())

    strategy.learn(task, data, LearnOptions(epochs=1, batch_size=batch_size, learning_rate=1e-3), progress, {})
    return [b - a for a, b in itertools.pairwise(stamps)]


def bench_learn_scaling(quick: bool) -> list[dict[str, Any]]:
    """Median step time of a new task with many vs. one previous task, alternating."""
    repeats = 2 if quick else 4
    data = _task(99, 256)  # 16 steps of 16
    rows = []
    for k, many in ((32, 50), (32, 32), (4, 50)):
        few_strategy = _strategy(1, max_regularized_tasks=k)
        many_strategy = _strategy(many if not quick else min(many, 40), max_regularized_tasks=k)
        few: list[float] = []
        lots: list[float] = []
        for repeat in range(repeats):
            few += step_times(few_strategy, f"new{repeat}", data, 16)
            lots += step_times(many_strategy, f"new{repeat}", data, 16)
        rows.append(
            {
                "max_regularized_tasks": k,
                "previous": many if not quick else min(many, 40),
                "step_ms_previous_1": 1000 * statistics.median(few),
                "step_ms_previous_many": 1000 * statistics.median(lots),
                "ratio": statistics.median(lots) / statistics.median(few),
            }
        )
        print(f"learn scaling K={k}: {rows[-1]}", flush=True)
    return rows


def _throughput(call: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``call`` over about ``seconds``."""
    count = 0
    started = time.perf_counter()
    while True:
        call()
        count += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return count / elapsed


def bench_predict(quick: bool) -> list[dict[str, Any]]:
    """Throughput of the uncle predictor (cached generated weights) vs. an ordinary backbone, batch 64."""
    from server.engine.backbones import build_backbone

    rows = []
    x = torch.from_numpy(load_digits().inputs[:64])
    for backbone in ("mlp", "cnn"):
        strategy = _strategy(1, backbone=backbone)
        predictor = strategy.predictor()
        predictor.predict("old0", x)  # generate and cache the weights
        ordinary = build_backbone(backbone, DIGITS_SHAPE, 10).eval()
        with torch.no_grad():
            ordinary.load_state_dict({**predictor.parameters_for("old0")}, strict=False)

        def plain(model: torch.nn.Module = ordinary) -> None:
            with torch.no_grad():
                model(x)

        def cached(name: str = "old0", served: Any = predictor) -> None:
            served.predict(name, x)

        ratios = []
        base_all, lethe_all = [], []
        for _ in range(3 if quick else 7):
            base = _throughput(plain, 0.3)
            lethe = _throughput(cached, 0.3)
            base_all.append(base)
            lethe_all.append(lethe)
            ratios.append(lethe / base)
        rows.append(
            {
                "backbone": backbone,
                "ordinary_batches_per_s": statistics.median(base_all),
                "cached_batches_per_s": statistics.median(lethe_all),
                "ratio": statistics.median(ratios),
            }
        )
        print(f"predict {backbone}: {rows[-1]}", flush=True)
    return rows


def bench_sizes() -> list[dict[str, Any]]:
    """Hypernetwork vs. generated network parameters for the backbones."""
    rows = []
    for backbone, shape, classes in (
        ("resnet18", (3, 32, 32), 100),
        ("cnn", DIGITS_SHAPE, 10),
        ("mlp", DIGITS_SHAPE, 10),
    ):
        strategy = build_uncle(backbone=backbone, input_shape=shape, num_classes=classes, device=CPU, seed=0)
        d = strategy.describe()
        rows.append(
            {
                "backbone": backbone,
                "input_shape": list(shape),
                "classes": classes,
                "generated": int(d["target_parameters"]),
                "hypernetwork": int(d["hypernetwork_parameters"]),
                "ratio": d["hypernetwork_to_target_ratio"],
                "chunk_size": int(d["chunk_size"]),
                "chunks": int(d["chunks"]),
            }
        )
        print(f"sizes {backbone}: {rows[-1]}", flush=True)
    return rows


def _accuracy(strategy: UncleStrategy, task: str, data: TaskData) -> float:
    logits = strategy.predictor().predict(task, data.inputs)
    return 100.0 * float((logits.argmax(1) == data.labels).float().mean())


def bench_chunking(quick: bool) -> list[dict[str, Any]]:
    """Accuracy of uncle with the ``cnn`` backbone at the automatic and a 4x smaller chunk size."""
    tasks = 2 if quick else 3
    epochs = 1 if quick else 3
    auto = build_uncle(backbone="cnn", input_shape=DIGITS_SHAPE, num_classes=10, device=CPU, seed=0)
    auto_chunk = int(auto.describe()["chunk_size"])
    rows = []
    for chunk in (auto_chunk, max(8, auto_chunk // 4)):
        strategy = build_uncle(
            backbone="cnn", input_shape=DIGITS_SHAPE, num_classes=10, device=CPU, seed=0, chunk_size=chunk
        )
        splits = []
        started = time.perf_counter()
        for index in range(tasks):
            data = load_digits().permute_pixels(index)
            train, test = data.split(0.8, seed=index)
            splits.append(TaskData(torch.from_numpy(test.inputs), torch.from_numpy(test.labels)))
            options = LearnOptions(epochs=epochs, batch_size=32, learning_rate=1e-3, seed=0)
            strategy.learn(
                f"p{index}",
                TaskData(torch.from_numpy(train.inputs), torch.from_numpy(train.labels)),
                options,
                _no_progress,
                {},
            )
        seconds = time.perf_counter() - started
        accuracies = [_accuracy(strategy, f"p{i}", splits[i]) for i in range(tasks)]
        d = strategy.describe()
        rows.append(
            {
                "chunk_size": chunk,
                "automatic": chunk == auto_chunk,
                "hypernetwork_to_target_ratio": d["hypernetwork_to_target_ratio"],
                "mean_accuracy": statistics.fmean(accuracies),
                "accuracies": accuracies,
                "learn_seconds": seconds,
                "tasks": tasks,
                "epochs": epochs,
            }
        )
        print(f"chunking {chunk}: {rows[-1]}", flush=True)
    return rows


def bench_resnet18(quick: bool) -> list[dict[str, Any]]:
    """ResNet-18 on one digits task: generated by uncle at its automatic chunking vs ordinary weights.

    Both train with Adam (lr 1e-3, batch 32, the strategy's step schedule: ×0.3 after 60% and 85%
    of the steps) for the same epochs on the same 80% and are tested on the other 20%.
    """
    epochs = 1 if quick else 3
    train, test = load_digits().split(0.8, seed=0)
    inputs, labels = torch.from_numpy(train.inputs), torch.from_numpy(train.labels)
    if quick:
        inputs, labels = inputs[:128], labels[:128]
    probe = TaskData(torch.from_numpy(test.inputs), torch.from_numpy(test.labels))
    steps = epochs * count_minibatches(len(labels), 32)
    milestones = [round(0.6 * steps), round(0.85 * steps)]

    with seeded_rng(0):
        model = build_backbone("resnet18", DIGITS_SHAPE, 10, cifar_stem=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.3)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for batch in minibatches(len(labels), 32, generator):  # the strategy's batching
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    ordinary_seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        ordinary = 100.0 * float((model(probe.inputs).argmax(1) == probe.labels).float().mean())
    parameters = sum(p.numel() for p in model.parameters())
    rows = [
        {
            "model": "ordinary weights",
            "accuracy": ordinary,
            "learn_seconds": ordinary_seconds,
            "parameters": parameters,
            "epochs": epochs,
            "samples": len(labels),
        }
    ]
    print(f"resnet18: {rows[-1]}", flush=True)

    strategy = build_uncle(backbone="resnet18", input_shape=DIGITS_SHAPE, num_classes=10, device=CPU, seed=0)
    started = time.perf_counter()
    strategy.learn("digits", TaskData(inputs, labels), LearnOptions(epochs, 32, 1e-3, seed=0), _no_progress, {})
    d = strategy.describe()
    rows.append(
        {
            "model": f"uncle, chunk {int(d['chunk_size'])} × {int(d['chunks'])}",
            "accuracy": _accuracy(strategy, "digits", probe),
            "learn_seconds": time.perf_counter() - started,
            "parameters": int(d["hypernetwork_parameters"]),
            "epochs": epochs,
            "samples": len(labels),
        }
    )
    print(f"resnet18: {rows[-1]}", flush=True)
    return rows


def render(results: dict[str, Any], elapsed: float, quick: bool) -> str:
    """The markdown block of the benchmarks."""

    def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    command = "python -m benchmarks.bench_uncle" + (" --quick" if quick else "")
    out = [
        f"_Generated by `{command}` in {elapsed:.0f} s; {machine_line()}, shared with other jobs; one torch thread. "
        "Medians of interleaved repetitions._",
        "",
    ]
    out += [
        "**Learn step time, many previous tasks ÷ 1 previous task** (mlp, batch 16, default regularization "
        "budget of 2 networks' chunks per step; goal ≤ 1.5):",
        "",
    ]
    out.append(
        table(
            ["K (max_regularized_tasks)", "previous tasks", "ms/step, 1 previous", "ms/step, many", "ratio", "goal"],
            [
                [
                    str(r["max_regularized_tasks"]),
                    str(r["previous"]),
                    f"{r['step_ms_previous_1']:.1f}",
                    f"{r['step_ms_previous_many']:.1f}",
                    f"{r['ratio']:.2f}",
                    verdict(r["ratio"] <= 1.5),
                ]
                for r in results["learn_scaling"]
            ],
        )
    )
    scaling = {(r["max_regularized_tasks"], r["previous"]): r for r in results["learn_scaling"]}
    default_k = max(k for k, _ in scaling)
    above = sorted(key for key in scaling if key[0] == default_k and key[1] >= key[0])
    if len(above) >= 2:
        low, high = scaling[above[0]], scaling[above[-1]]
        out += [
            "",
            f"Both counts at or above K = {above[0][0]}: {high['previous']} previous tasks ÷ {low['previous']} "
            f"previous tasks = {high['step_ms_previous_many']:.1f} / {low['step_ms_previous_many']:.1f} ms = "
            f"**{high['step_ms_previous_many'] / low['step_ms_previous_many']:.2f}** (separate repetitions, so "
            "noisier than the interleaved ratios).",
        ]
    out += ["", "**Predict, cached generated weights ÷ ordinary weights** (batch 64, CPU; goal ≥ 0.9):", ""]
    out.append(
        table(
            ["backbone", "ordinary batches/s", "uncle cached batches/s", "ratio", "goal"],
            [
                [
                    r["backbone"],
                    f"{r['ordinary_batches_per_s']:.0f}",
                    f"{r['cached_batches_per_s']:.0f}",
                    f"{r['ratio']:.2f}",
                    verdict(r["ratio"] >= 0.9),
                ]
                for r in results["predict"]
            ],
        )
    )
    out += ["", "**Hypernetwork size** (default options; goal for resnet18 ≤ 1):", ""]
    out.append(
        table(
            ["backbone", "input", "generated params", "hypernetwork params", "ratio", "chunk size × chunks"],
            [
                [
                    r["backbone"],
                    "×".join(str(d) for d in r["input_shape"]) + f", {r['classes']} classes",
                    f"{r['generated']:,}",
                    f"{r['hypernetwork']:,}",
                    f"{r['ratio']:.3f}" + (f" ({verdict(r['ratio'] <= 1)})" if r["backbone"] == "resnet18" else ""),
                    f"{r['chunk_size']} × {r['chunks']}",
                ]
                for r in results["sizes"]
            ],
        )
    )
    c = results["chunking"]
    out += [
        "",
        f"**Accuracy cost of the chunking** (cnn proxy: {c[0]['tasks']} permuted-digits tasks, {c[0]['epochs']} "
        "epochs, own 80/20 split, accuracy on the 20%):",
        "",
    ]
    out.append(
        table(
            ["chunk size", "hypernetwork ÷ generated", "mean accuracy %", "per task", "learn s"],
            [
                [
                    f"{r['chunk_size']}" + (" (automatic)" if r["automatic"] else ""),
                    f"{r['hypernetwork_to_target_ratio']:.3f}",
                    f"{r['mean_accuracy']:.1f}",
                    ", ".join(f"{a:.1f}" for a in r["accuracies"]),
                    f"{r['learn_seconds']:.0f}",
                ]
                for r in c
            ],
        )
    )
    r18 = results.get("resnet18")
    if r18:
        out += [
            "",
            f"**ResNet-18 itself** (CIFAR stem, on 1×8×8 digits: one task, {r18[0]['samples']} training samples, "
            f"{r18[0]['epochs']} epochs, accuracy on the other 20%; `--only resnet18`):",
            "",
            table(
                ["weights", "trained parameters", "accuracy %", "learn s"],
                [
                    [r["model"], f"{r['parameters']:,}", f"{r['accuracy']:.1f}", f"{r['learn_seconds']:.0f}"]
                    for r in r18
                ],
            ),
        ]
    out += [
        "",
        "ResNet-18 accuracy on CIFAR-100 with the generated weights was **not measured**: it needs a GPU run "
        "that was not available for this work; the rows above are CPU-sized measurements of the effect of "
        "the chunking.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; write the report block and raw JSON. Returns 0."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_uncle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, fewer tasks and epochs")
    parser.add_argument("--no-doc", action="store_true", help="print the report instead of writing docs/")
    parser.add_argument("--render-only", action="store_true", help="rewrite the report from the raw JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    parser.add_argument(
        "--only", default="", help="comma-separated subset: learn,predict,sizes,chunking,resnet18 (default: all)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(filter(None, args.only.split(","))) or {"learn", "predict", "sizes", "chunking", "resnet18"}
    if args.render_only:
        only = set()
    started = time.perf_counter()
    previous: dict[str, Any] = json.loads(RAW.read_text()) if RAW.exists() else {}
    results: dict[str, Any] = dict(previous)
    if "sizes" in only:
        results["sizes"] = bench_sizes()
    if "predict" in only:
        results["predict"] = bench_predict(args.quick)
    if "learn" in only:
        results["learn_scaling"] = bench_learn_scaling(args.quick)
    if "chunking" in only:
        results["chunking"] = bench_chunking(args.quick)
    if "resnet18" in only:
        results["resnet18"] = bench_resnet18(args.quick)
    elapsed = time.perf_counter() - started if only else float(results.get("elapsed", 0.0))
    if {"learn", "predict", "sizes", "chunking"} <= only:
        results["elapsed"] = elapsed
    RAW.parent.mkdir(parents=True, exist_ok=True)
    RAW.write_text(json.dumps(results, indent=1))
    missing = {"sizes", "predict", "learn_scaling", "chunking"} - set(results)
    if missing:
        print(f"not rendered, missing sections: {', '.join(sorted(missing))}")
        return 0
    text = render(results, elapsed, args.quick)
    if args.no_doc:
        print(text)
    else:
        write_section(DOC, BENCH_SECTION, text, title=TITLE)
        print(f"wrote the Benchmarks section of {Path(DOC).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

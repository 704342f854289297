"""CLPU-style temporary learning through the gRPC API: the R/T/F request protocol on split digits.

``python -m benchmarks.repro_clpu [--seeds 0,1,2] [--strategies uncle,lure,finetune] [--out DIR]``

The seed on continual learning and unlearning (CLPU, Liu et al.) gives every request one of three
instructions: **R** learn a task permanently (or, for a task learned temporarily, merge it), **T**
learn it temporarily, **F** forget a temporary task exactly. sklearn's digits are split into five
two-class tasks (0-1, 2-3, ..., 8-9); per seed, 20% of each task is a held-out test set (Predict
only) and the rest is streamed as its Learn. Each (strategy, seed) runs this sequence on a fresh
``lethe serve`` at the server's defaults (the probe share excepted, 20%):

    R t0, T t1, R t2, T t3, F t1, R t3 (= Commit), T t4, F t4

Reported, mean ± standard deviation over the seeds:

* **committed task**: t3's test accuracy while temporary (its side network) and after the commit;
* **final accuracy** of the permanent tasks (t0, t2, t3) after the last request;
* **exactness of temporary forgetting**: the largest difference of any Predict probability on
  every permanent task's test set between just before ``T t4`` and just after ``F t4`` (0 = the
  model is bit-identical), with the F jobs' ``forget_verified`` and ``unlearn_seconds``;
* **cost**: the strategy's compute time (job metric ``learn_seconds``) of the commit of t3 ÷ that of
  the permanent learn of t2 (same-size task, second learn of the server: no warm-up, one earlier
  task to protect or replay, where the commit has two), and of a temporary learn ÷ the same. Job
  wall times (with evaluation and checkpoint) are in ``results.json``.

Class-incremental ``lure`` is asked with ``task=None`` (routing between the main model and the
side networks, docs/architecture.md). Results go to ``<out>/results.json``, and the table into the
``repro-clpu`` section of ``docs/reproduction.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.servers import scratch_lethe_server
from client import LetheClient, pb
from client.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
TASKS = {f"t{i}": (2 * i, 2 * i + 1) for i in range(5)}
SEQUENCE = [("R", "t0"), ("T", "t1"), ("R", "t2"), ("T", "t3"), ("F", "t1"), ("R", "t3"), ("T", "t4"), ("F", "t4")]
START, END = "<!-- repro-clpu:start -->", "<!-- repro-clpu:end -->"


def split(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Each task's (train inputs, train labels, test inputs, test labels) for ``seed``."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    out = {}
    for name, classes in TASKS.items():
        data = digits.select(list(classes))
        order = rng.permutation(len(data.labels))
        n_test = len(order) // 5
        test, train = order[:n_test], order[n_test:]
        out[name] = {
            "x": data.inputs[train],
            "y": data.labels[train],
            "xt": data.inputs[test],
            "yt": data.labels[test],
        }
    return out


def _seconds(job: pb.Job) -> float:
    return (job.finished_at.ToNanoseconds() - job.started_at.ToNanoseconds()) / 1e9


def run(strategy: str, seed: int) -> dict[str, Any]:
    """The R/T/F sequence on a fresh server; the measurements of the module docstring."""
    data = split(seed)
    settings = {"model.strategy": strategy, "model.seed": seed, "training.holdout_fraction": 0.2}
    with scratch_lethe_server(settings, base={}, prefix="lethe-repro-clpu-") as server:
        client: LetheClient = server.client
        task_incremental = client.model().task_incremental

        def name(task: str) -> str | None:
            return task if task_incremental else None

        def accuracy(task: str) -> float:
            d = data[task]
            return 100.0 * float(np.mean(client.predict(name(task), d["xt"]).classes == d["yt"]))

        def probabilities(tasks: Sequence[str]) -> dict[str, np.ndarray]:
            return {t: np.asarray(client.predict(name(t), data[t]["xt"], probabilities=True).outputs) for t in tasks}

        jobs: dict[str, pb.Job] = {}
        result: dict[str, Any] = {"strategy": strategy, "seed": seed}
        before_t4: dict[str, np.ndarray] = {}
        for step, (instruction, task) in enumerate(SEQUENCE):
            if step == 6:
                before_t4 = probabilities(["t0", "t2", "t3"])
            if instruction == "R" and task in jobs:
                job = client.wait(client.commit(task).id, timeout=600)
            elif instruction in ("R", "T"):
                d = data[task]
                job = client.wait(client.learn(task, d["x"], d["y"], temporary=instruction == "T").id, timeout=600)
            else:
                job = client.wait(client.unlearn(task, reason="F instruction").id, timeout=600)
            if job.state != pb.SUCCEEDED:
                raise RuntimeError(f"{strategy} seed {seed}: {instruction} {task} ended {job.state}: {job.message}")
            jobs[f"{instruction}:{task}"] = job
            jobs.setdefault(task, job)
            if step == 3:
                result["t3_temporary"] = accuracy("t3")
        after = probabilities(["t0", "t2", "t3"])
        result["t3_committed"] = accuracy("t3")
        result["final"] = {t: accuracy(t) for t in ("t0", "t2", "t3")}
        result["max_probability_change"] = max(float(np.max(np.abs(after[t] - before_t4[t]))) for t in after)
        forgets = [jobs["F:t1"], jobs["F:t4"]]
        result["forget_verified"] = [f.metrics["forget_verified"] for f in forgets]
        result["unlearn_seconds"] = [f.metrics["unlearn_seconds"] for f in forgets]
        permanent = jobs["R:t2"].metrics["learn_seconds"]
        result["commit_over_learn"] = jobs["R:t3"].metrics["learn_seconds"] / permanent
        temporary = statistics.mean(jobs[f"T:{t}"].metrics["learn_seconds"] for t in ("t1", "t3", "t4"))
        result["temporary_over_learn"] = temporary / permanent
        result["job_seconds"] = {key: _seconds(job) for key, job in jobs.items() if ":" in key}
        result["commit_spill"] = jobs["R:t3"].metrics["spill"]
    return result


def _ms(values: Sequence[float], digits: int = 1) -> str:
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of the module docstring's measurements."""
    lines = [
        "| strategy | t3 temporary (%) | t3 committed (%) | final t0 / t2 / t3 (%) | commit spill (pts) "
        "| max Δp after T+F | F verified | F seconds | commit ÷ learn | temporary ÷ learn |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        rows = [r for r in results if r["strategy"] == strategy]
        final = " / ".join(_ms([r["final"][t] for r in rows], 0) for t in ("t0", "t2", "t3"))
        verified = all(v == 1.0 for r in rows for v in r["forget_verified"])
        seconds = max(s for r in rows for s in r["unlearn_seconds"])
        lines.append(
            f"| `{strategy}` | {_ms([r['t3_temporary'] for r in rows])} | {_ms([r['t3_committed'] for r in rows])} "
            f"| {final} | {_ms([r['commit_spill'] for r in rows])} "
            f"| {max(r['max_probability_change'] for r in rows):.3g} | {'all' if verified else 'NOT all'} "
            f"| ≤ {seconds:.3f} | {_ms([r['commit_over_learn'] for r in rows], 2)} "
            f"| {_ms([r['temporary_over_learn'] for r in rows], 2)} |"
        )
    return "\n".join(lines)


def write_section(markdown: str, seeds: Sequence[int], seconds: float) -> None:
    """Replace the ``repro-clpu`` section of docs/reproduction.md (append it the first time)."""
    path = ROOT / "docs" / "reproduction.md"
    text = path.read_text(encoding="utf-8")
    body = (
        f"{START}\n_Generated by `python -m benchmarks.repro_clpu` (seeds {', '.join(map(str, seeds))}, "
        f"{seconds / 60:.1f} min on this machine's CPU)._\n\n{markdown}\n{END}"
    )
    if START in text:
        head, rest = text.split(START, 1)
        text = head + body + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default="uncle,lure,finetune")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "repro-clpu")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/reproduction.md")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.monotonic()
    results = []
    for strategy in args.strategies.split(","):
        for seed in seeds:
            began = time.monotonic()
            results.append(run(strategy, seed))
            print(f"{strategy} seed {seed}: {time.monotonic() - began:.0f} s {json.dumps(results[-1])}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    markdown = table(results)
    print(markdown)
    if not args.no_docs:
        write_section(markdown, seeds, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

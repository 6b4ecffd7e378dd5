"""The closing report of `seedpipe demo`: the results table (each metric beside chance), the
training losses, where everything was written, the commands that come next, and summary.json
(what `benchmarks/bench_demo.py` reads)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.demo import Demo

DONE = ("built", "trained", "measured")
"""Step statuses that did work; the others (up to date, skipped, reused) reused earlier work."""


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) from a run's rank-0 metric log, by step (a resumed run rewrites steps)."""
    path = run_dir / "metrics.jsonl"
    by_step: dict[int, float] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if "loss" in record["metrics"]:
            by_step[record["step"]] = record["metrics"]["loss"]
    return sorted(by_step.items())


def loss_text(losses: list[tuple[int, float]]) -> str:
    if not losses:
        return "no loss logged"
    (s0, first), (s1, last) = losses[0], losses[-1]
    return f"loss {first:.3f} (step {s0}) -> {last:.3f} (step {s1})"


def next_commands(demo: Demo) -> list[str]:
    """The commands to try next: only those this build has."""
    from jobs.cli import DELEGATED
    from pipelines.tracking import tracking_uri

    root, models, corpus = demo.config.root, demo.models, demo.config.corpus
    samples = demo.samples()
    prompt = (
        samples[-1].stem.split("-", 1)[1].replace("_", " ")
        if samples
        else "a red ring at the top left on a white background"
    )
    store = tracking_uri(demo.catalog)
    wanted = [
        # `seedpipe ui` serves a store it can open itself; a tracking server is its own UI
        ("ui", f"open {store} (the tracking server's MLflow UI)" if store.startswith(("http://", "https://"))
         else f"seedpipe ui --root {root}"),
        ("caption", f"seedpipe caption {' '.join(str(p) for p in samples[:2])} --root {root} --lora {models['lora']}"),
        ("generate", f'seedpipe generate "{prompt}" --root {root} --lora {models["lora"]}'),
        ("lineage", f"seedpipe lineage {models['lora']} --root {root}"),
        ("evaluate", f"seedpipe evaluate --root {root} --corpus {corpus} --tokenizer {models['tokenizer']} --lora {models['lora']}"),
    ]  # fmt: skip
    return [command for name, command in wanted if name in DELEGATED]


def report(demo: Demo, seconds: float) -> str:
    """The closing report: results table, training losses, where things are, what to run next."""
    from jobs.eval_report import format_table
    from pipelines.storage import join_uri
    from pipelines.tracking import tracking_uri

    ev, split = demo.evaluation, demo.evaluation.get("split", {})
    title = (f"results on the held-out split ({split.get('rows', '?')} images, {split.get('captions', '?')} "
             "distinct captions); chance = the expected value of a random ranking")  # fmt: skip
    lines = [
        "",
        format_table(ev.get("metrics", {}), ev.get("chance", {}), title),
        "",
        "training losses:",
    ]
    for r in demo.results:
        if "loss_first" in r.info and r.info["loss_first"] is not None:
            lines.append(
                f"  {r.name:8s} {r.info['loss_first']:.3f} -> {r.info['loss_last']:.3f} over {r.info['steps']} steps"
            )
    reused = [r.name for r in demo.results if r.status not in DONE]
    lines += ["", f"demo finished in {seconds:.1f} s" + (f"; reused what was up to date: {', '.join(reused)}" if reused else ""),
              "", "where everything is:",
              f"  corpus         {demo.catalog.location(demo.catalog.corpus_dir(demo.config.corpus))}",
              f"  runs           {join_uri(demo.root, 'runs')}",
              f"  MLflow store   {tracking_uri(demo.catalog)}",
              "  models         " + ", ".join(f"{k} {v}" for k, v in demo.models.items()),
              f"  results        {demo.location('evaluation.json')}",
              f"  step logs      {demo.location('logs')}",
              "", "next:"]  # fmt: skip
    return "\n".join(lines + [f"  {command}" for command in next_commands(demo)])


def summary(demo: Demo, seconds: float) -> dict[str, Any]:
    return {"seconds": seconds, "steps": [dataclasses.asdict(r) for r in demo.results], "models": demo.models,
            "datasets": demo.datasets, "metrics": demo.evaluation.get("metrics", {}),
            "chance": demo.evaluation.get("chance", {}), "split": demo.evaluation.get("split", {})}  # fmt: skip

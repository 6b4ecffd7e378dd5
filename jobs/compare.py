"""`seedpipe compare`: runs side by side, and which tokenizer is better, in one command.

    seedpipe compare RUN... [--out DIR] [--root R]
    seedpipe compare [--experiment NAME] [--stage stage1|stage2|lora|features|...] [--corpus C] [--last N]

RUN: a run id, a run name, or `models:/name/<version>` (the run that trained it). Without RUNs,
the `--last` N most recent runs of `--experiment`, filtered by `--stage` / `--corpus`.

Printed, and written as `compare.md` beside `compare.png` in `--out` (default
`<root>/reports/compare-<UTC time>/`):
- the params that differ, and only those; bookkeeping settings that differ (run name, root,
  checkpoint cadence: `pipelines.tracking.run_tags.is_bookkeeping`) on their own line, since
  they do not change what a run computes;
- each metric's final value and its best (min for losses/MSE/dead codes, max for recalls,
  accuracies, usage, cosines; none for rates such as lr or samples/s);
- the input datasets and models (name @ digest) and whether they differ, and the code version;
- the `seedpipe evaluate` results of the models the runs registered, when an evaluate run of that
  model exists (retrieval from embeddings and from codes, codebook usage): comparing two
  tokenizer trainings compares the tokenizers;
- `compare.png`: one panel per curve (loss, then the eval metrics) with every run on it.
Runs are read from MLflow alone (`jobs.run_index`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobs.run_index import RUN_ID, RunIndex, RunInfo
from pipelines.config import cli_main, parse_command
from pipelines.tracking.run_tags import is_bookkeeping

SHORT = 12
MAX_PANELS = 8
_LOWER = re.compile(r"(loss|mse|^(eval/)?(itc|vq|recon|gen)$|dead_codes|failed)")
_NO_BEST = re.compile(
    r"(^lr$|temperature|_per_s$|rows|target_tokens|shards|_s$|^successes$|^new_|chance)"
)
_VALUE_FLAGS = ("--root", "--experiment", "--stage", "--corpus", "--last", "--out", "--config")


@dataclass(kw_only=True)
class CompareConfig:
    runs: list[str] = field(default_factory=list)
    """Run ids, run names or models:/ URIs; none: the --last runs of --experiment (--stage, --corpus)."""
    root: str = "./seed-data"
    """Catalog root whose tracking store to read (unless MLFLOW_TRACKING_URI)."""
    experiment: str = "seedpipe"
    """MLflow experiment."""
    stage: str = ""
    """Without RUNs: only runs of this stage (stage1, stage2, lora, features, qembeds, tokens, evaluate, ingest)."""
    corpus: str = ""
    """Without RUNs: only runs on this corpus."""
    last: int = 5
    """Without RUNs: how many of the most recent matching runs."""
    out: str = ""
    """Folder for compare.png and compare.md (default: <root>/reports/compare-<UTC time>)."""
    json: bool = False
    """Print the comparison as JSON instead of the table."""

    def __post_init__(self) -> None:
        if self.last < 2:
            raise ValueError(
                f"last must be at least 2 (got {self.last}): a comparison needs two runs"
            )


def direction(metric: str) -> str | None:
    """'min' or 'max' when a metric has a best value, None for rates and counts."""
    if _NO_BEST.search(metric):
        return None
    return "min" if _LOWER.search(metric) else "max"


@dataclass
class Compared:
    """What `compare` found: runs (oldest first) and the rows of the table."""

    runs: list[RunInfo]
    params: dict[str, list[str | None]]
    settings: dict[str, list[str | None]]
    metrics: dict[str, list[dict[str, float | None]]]
    inputs: dict[str, list[str | None]]
    evaluations: dict[str, list[float | None]]
    evaluated: list[str]
    """Per run: the model and evaluate run the evaluation rows come from ('' when none)."""
    history: dict[str, list[list[tuple[int, float]]]]

    @property
    def inputs_differ(self) -> bool:
        return any(len(set(v)) > 1 for v in self.inputs.values())

    def to_json(self) -> dict[str, Any]:
        return {"runs": [r.summary for r in self.runs], "params_differ": self.params,
                "settings_differ": self.settings, "metrics": self.metrics, "inputs": self.inputs,
                "inputs_differ": self.inputs_differ, "evaluations": self.evaluations,
                "evaluated": self.evaluated}  # fmt: skip


# ---- gathering
def select_runs(index: RunIndex, config: CompareConfig) -> list[RunInfo]:
    """The runs named by `config.runs`, or the latest --last matching runs; oldest first."""
    if config.runs:
        runs = [resolve_run(index, ref) for ref in config.runs]
    else:
        matching = [r for r in index.runs.values() if (not config.stage or r.stage == config.stage)
                    and (not config.corpus or r.corpus == config.corpus)]  # fmt: skip
        runs = sorted(matching, key=lambda r: r.start_ms)[-config.last :]
    if len({r.run_id for r in runs}) < 2:
        what = (
            ", ".join(config.runs)
            or f"stage {config.stage or 'any'}, corpus {config.corpus or 'any'}"
        )
        raise ValueError(f"compare needs at least two different runs; found {len(runs)} for {what} in "
                         f"experiment {config.experiment!r} at {index.uri}")  # fmt: skip
    unique = {r.run_id: r for r in runs}
    return sorted(unique.values(), key=lambda r: r.start_ms)


def resolve_run(index: RunIndex, ref: str) -> RunInfo:
    if RUN_ID.match(ref):
        return index.run(ref)
    if ref.startswith("models:/"):
        version = index.version(ref)
        if version.run_id not in index.runs:
            raise ValueError(
                f"{ref}: its source run {version.run_id} is not in experiment {index.experiment!r}"
            )
        return index.runs[version.run_id]
    named = [r for r in index.runs.values() if r.name == ref]
    if len(named) != 1:
        hint = (
            f"runs named so: {', '.join(r.run_id for r in named)}"
            if named
            else "no run has that name"
        )
        raise ValueError(f"{ref}: not a run id, a models:/ URI or a unique run name ({hint})")
    return named[0]


def compare(index: RunIndex, runs: list[RunInfo]) -> Compared:
    """The rows of the comparison of `runs`."""
    keys = sorted({k for r in runs for k in r.params})
    differ = {
        k: [r.params.get(k) for r in runs] for k in keys if len({r.params.get(k) for r in runs}) > 1
    }
    history: dict[str, list[list[tuple[int, float]]]] = {}
    metrics: dict[str, list[dict[str, float | None]]] = {}
    for key in sorted({k for r in runs for k in r.metrics if not k.startswith("chance/")}):
        series = [_history(index, r, key) for r in runs]
        history[key] = series
        metrics[key] = [_final_best(key, r, s) for r, s in zip(runs, series, strict=True)]
    uses = [
        {**{u.name: u.digest for u in r.inputs}, **{f"model:{m.uri}": m.digest for m in r.models}}
        for r in runs
    ]
    inputs = {name: [u.get(name) for u in uses] for name in sorted({n for u in uses for n in u})}
    evaluations, evaluated = _evaluations(index, runs)
    return Compared(runs=runs, params={k: v for k, v in differ.items() if not is_bookkeeping(k)},
                    settings={k: v for k, v in differ.items() if is_bookkeeping(k)}, metrics=metrics,
                    inputs=inputs, evaluations=evaluations, evaluated=evaluated, history=history)  # fmt: skip


def _history(index: RunIndex, run: RunInfo, key: str) -> list[tuple[int, float]]:
    points = index.client.get_metric_history(run.run_id, key)
    by_step = {
        int(m.step): float(m.value) for m in sorted(points, key=lambda m: (m.step, m.timestamp))
    }
    return sorted(by_step.items())


def _final_best(key: str, run: RunInfo, series: list[tuple[int, float]]) -> dict[str, float | None]:
    if not series:
        return {"final": run.metrics.get(key), "best": None}
    values = [v for _, v in series]
    best = {"min": min, "max": max}.get(direction(key) or "", lambda _: None)(values)
    return {"final": values[-1], "best": best}


def _evaluations(
    index: RunIndex, runs: list[RunInfo]
) -> tuple[dict[str, list[float | None]], list[str]]:
    """Per run, the metrics of the latest finished evaluate run of a model it registered."""
    found: list[dict[str, float]] = []
    evaluated = []
    for run in runs:
        best: tuple[int, dict[str, float], str] = (-1, {}, "")
        for version in index.versions_of_run(run.run_id):
            for ev in index.consumers(version.digest):
                if ev.stage == "evaluate" and ev.status == "FINISHED" and ev.start_ms > best[0]:
                    metrics = {k: v for k, v in ev.metrics.items() if not k.startswith("chance/")}
                    best = (ev.start_ms, metrics, f"{version.uri} (evaluate run {ev.run_id})")
        found.append(best[1])
        evaluated.append(best[2])
    keys = sorted({k for m in found for k in m})
    return {k: [m.get(k) for m in found] for k in keys}, evaluated


# ---- output
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value) if value != "" else "''"


def table_rows(c: Compared) -> list[tuple[str, list[str]]]:
    """(section or row label, cells) in print order; a section has no cells."""
    rows: list[tuple[str, list[str]]] = [
        ("run id", [r.run_id for r in c.runs]),
        ("stage / corpus", [f"{r.stage} / {r.corpus}" for r in c.runs]),
        ("status", [r.status.lower() for r in c.runs]),
        ("code version", [r.tags.get("code_version", "-") for r in c.runs]),
    ]
    total = len({k for r in c.runs for k in r.params})
    rows.append(
        (
            f"params that differ ({len(c.params)} of {total})" if c.params else "params: all equal",
            [],
        )
    )
    rows += [(k, [_fmt(v) for v in vals]) for k, vals in c.params.items()]
    if c.settings:
        rows.append(("settings that differ (bookkeeping, not compared)", []))
        rows += [(k, [_fmt(v) for v in vals]) for k, vals in c.settings.items()]
    rows.append(("inputs: differ" if c.inputs_differ else "inputs: the same", []))
    rows += [
        (k + (" (differs)" if len(set(v)) > 1 else ""), [(d or "-")[:SHORT] for d in v])
        for k, v in c.inputs.items()
    ]
    rows.append(("metrics: final / best", []))
    for key, cells in c.metrics.items():
        rows.append(
            (
                key,
                [
                    _fmt(x["final"]) + (f" / {_fmt(x['best'])}" if x["best"] is not None else "")
                    for x in cells
                ],
            )
        )
    if c.evaluations:
        rows.append(("seedpipe evaluate of the registered model", []))
        rows.append(("evaluated", [e.split(" (")[0] or "-" for e in c.evaluated]))
        rows += [(k, [_fmt(v) for v in vals]) for k, vals in c.evaluations.items()]
    return rows


def format_text(c: Compared) -> str:
    names = [r.name or r.run_id[:8] for r in c.runs]
    rows = table_rows(c)
    label_w = min(max(len(label) for label, cells in rows if cells) + 3, 40)
    col_w = min(
        max(max(len(n) for n in names), *(len(x) for _, cells in rows for x in cells)) + 2, 36
    )
    lines = [f"{'':{label_w}s}" + "".join(f"{n:{col_w}s}" for n in names)]
    for label, cells in rows:
        if not cells:
            lines.append(label)
            continue
        if len(label) > label_w - 3:  # a long dataset name: on its own line, the values under it
            lines.append(f"  {label}")
            label = ""
        lines.append(f"  {label:{label_w - 2}s}" + "".join(f"{x:{col_w}s}" for x in cells))
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(c: Compared) -> str:
    names = [r.name or r.run_id[:8] for r in c.runs]
    out = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for label, cells in table_rows(c):
        if not cells:
            out.append(f"| **{label}** |" + " |" * len(names))
        else:
            out.append(f"| {label} | " + " | ".join(f"`{x}`" for x in cells) + " |")
    return "\n".join(out) + "\n"


def plot(c: Compared, path: Path) -> Path:
    """One panel per curve (loss first, then eval metrics, then the rest), every run on each, a
    metric's chance level (`<name>_chance`, when logged) dotted on its panel."""
    from jobs.plots import pyplot

    plt = pyplot()

    keys = [k for k in c.history if any(c.history[k]) and "chance" not in k]
    order = sorted(
        keys, key=lambda k: (k != "loss", not k.startswith("eval/"), direction(k) is None, k)
    )
    keys = order[:MAX_PANELS]
    cols = min(len(keys), 4) or 1
    rows = -(-len(keys) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), sharex=True, squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys, strict=False):
        for i, series in enumerate(c.history[key]):
            if series:
                steps, values = zip(*series, strict=True)
                marker = "o" if len(series) < 20 else None
                ax.plot(steps, values, color=f"C{i}", marker=marker, ms=3)
        for i, series in enumerate(c.history.get(f"{key}_chance", [])):  # chance level, dotted
            if series:
                ax.plot(*zip(*series, strict=True), color=f"C{i}", ls=":", lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    if not keys:
        axes.flat[0].text(0.5, 0.5, "no metrics recorded", ha="center", va="center")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i}", marker="o", ms=3) for i in range(len(c.runs))]
    labels = [r.name or r.run_id[:8] for r in c.runs]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
    fig.tight_layout(rect=(0, 0.1 if rows == 1 else 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def out_dir(config: CompareConfig) -> Path:
    if config.out:
        return Path(config.out)
    if "://" in config.root:
        raise ValueError("--out DIR is required when the root is not a local folder")
    return Path(config.root, "reports", f"compare-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}")


def split_runs(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(RUN words, the rest): positional words that are no flag's value and no key=value."""
    runs, rest, expect_value = [], [], False
    for word in argv:
        if expect_value:
            rest.append(word)
            expect_value = False
        elif word.startswith("-"):
            rest.append(word)
            expect_value = word in _VALUE_FLAGS
        elif "=" in word and not word.startswith("models:/"):
            rest.append(word)
        else:
            runs.append(word)
    return runs, rest


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Compare runs side by side: differing params, final/best metrics, inputs, evaluations; PNG + Markdown."""
    runs, rest = split_runs(list(sys.argv[1:] if argv is None else argv))
    config = parse_command(CompareConfig, rest + runs, prog="seedpipe compare", description="\n\n".join(__doc__.split("\n\n")[:3]),
                           positional="runs" if runs else None)  # fmt: skip
    index = RunIndex.open(config.root, config.experiment)
    compared = compare(index, select_runs(index, config))
    folder = out_dir(config)
    png = plot(compared, folder / "compare.png")
    (folder / "compare.md").write_text(
        f"# compare\n\n![metric curves](compare.png)\n\n{format_markdown(compared)}"
    )
    if config.json:
        print(
            json.dumps(
                compared.to_json() | {"png": str(png), "markdown": str(folder / "compare.md")},
                indent=1,
            )
        )
    else:
        print(format_text(compared))
        print(f"wrote {png} and {folder / 'compare.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

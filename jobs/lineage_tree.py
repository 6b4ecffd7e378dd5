"""The lineage tree of `seedpipe lineage`: its nodes, their JSON, and how they print.

A `Node` is a run, a dataset, a model version or a URL list, with the MLflow run that made it
(`run`: id, name, status, stage, corpus, code version) and, after `--check`, its problems. Text is
one line per node under `├─` / `└─` guides, digests cut to 12 hex (JSON keeps them whole); a node
expanded earlier says `(see above)`. `describe` folds a tree into the one paragraph a registered
model version carries as its description.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SHORT = 12


@dataclass
class Node:
    """One line of the tree: a run, a dataset, a model version or a URL list."""

    kind: str
    label: str
    fields: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] | None = None
    """The MLflow run that made it (a run node: itself)."""
    children: list[Node] = field(default_factory=list)
    seen: bool = False
    """Expanded earlier in the tree."""
    problems: list[str] = field(default_factory=list)
    checked: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "label": self.label,
            **self.fields,
            "run": self.run,
        }
        if self.seen:
            out["seen_above"] = True
        if self.checked:
            out["check"] = {"ok": not self.problems, "problems": self.problems}
        out["children"] = [c.to_json() for c in self.children]
        return out

    def walk(self) -> Iterable[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


def node_text(node: Node) -> str:
    """What a node is, without the run that made it."""
    f = node.fields
    if node.kind == "run":
        extra = "".join(f", {k} {f[k]}" for k in ("preset", "encoder") if k in f)
        text = f"run {node.label} ({f['stage'] or '?'} on {f['corpus'] or '?'}{extra})"
    elif node.kind == "model":
        text = f"model {node.label} {f.get('model_kind', '')} digest {f['digest'][:SHORT]}"
        text += f" (used as {f['used_as']})" if f.get("used_as") else ""
        if f.get("evaluation"):
            text += ", evaluate: " + ", ".join(f"{k} {v}" for k, v in f["evaluation"].items())
    elif node.kind == "dataset":
        rows = f" {f['rows']} rows" if f.get("rows") is not None else ""
        text = f"dataset {node.label} digest {f['digest'][:SHORT]}{rows}"
        text += f", {f['shards']} shards" if "shards" in f else ""
        text += f", encoder {f['encoder']}" if f.get("encoder") else ""
    else:
        causes = ", ".join(f"{c} {n}" for c, n in sorted(f["failed_by_cause"].items()))
        text = (f"URL list {node.label} sha256 {f['digest'][:SHORT]}: {f['rows']} rows, "
                f"{f['downloaded']} downloaded, {f['failed']} failed{f' ({causes})' if causes else ''}, "
                f"{f['shards']} shards")  # fmt: skip
    return text + (f" [{f['note']}]" if f.get("note") else "")


def node_line(node: Node) -> str:
    """One node as one line: what it is, its MLflow run and status, `--check`'s verdict."""
    text, run = node_text(node), node.run
    if run and node.kind == "run":
        text += f"  {run['run_id']} {run['status']}, code {run['code_version'] or '?'}"
    elif run:
        verb = {"model": "trained", "url_list": "ingested"}.get(node.kind, "made")
        text += f"  <- {verb} by {run['stage']} run {run['run_id']} {run['status']}"
    if node.seen:
        text += "  (see above)"
    if node.checked:
        text += "  [check: ok]" if not node.problems else "  [check: DATA CHANGED]"
    return text


def render(node: Node, prefix: str = "", last: bool = True, top: bool = True) -> list[str]:
    """The tree as indented lines (`├─`, `└─`), a node's check problems under it."""
    lead = "" if top else prefix + ("└─ " if last else "├─ ")
    lines = [lead + node_line(node)]
    inner = "" if top else prefix + ("   " if last else "│  ")
    for problem in node.problems:
        lines.append(f"{inner}{'│  ' if node.children else '   '}! {problem}")
    for i, child in enumerate(node.children):
        lines += render(child, inner, i == len(node.children) - 1, top=False)
    return lines


def describe(node: Node) -> str:
    """The tree as one paragraph (a registered model version's description)."""

    def phrase(n: Node) -> str:
        text = node_text(n) + (f" (run {n.run['run_id'][:8]})" if n.run and n.kind != "run" else "")
        if n.kind == "run" and n.run:  # no status: the run being exported is still running
            text += f" {n.run['run_id'][:8]}"
        inner = [phrase(c) for c in n.children if not c.seen]
        if not inner:
            return text
        return f"{text} <- " + (inner[0] if len(inner) == 1 else "[" + "; ".join(inner) + "]")

    return "Lineage: " + phrase(node) + "."

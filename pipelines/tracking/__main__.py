"""`python -m pipelines.tracking replay RUN_DIR` / `sync ROOT`: push what an outage left queued."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from pipelines.tracking.outbox import replay_fallback
from pipelines.tracking.rundir import FALLBACK_FILE
from pipelines.tracking.stage_runs import pending_stage_runs, sync_pending


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.tracking", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="push one run folder's pending MLflow ops")
    replay.add_argument("run_dir")
    sync = sub.add_parser("sync", help="push the pending stage runs of a catalog root")
    sync.add_argument("root")
    sync.add_argument("--budget-s", type=float, default=300.0, help="time to spend at most")
    for p in (replay, sync):
        p.add_argument("--tracking-uri", default=None,
                       help="default: the store each run folder recorded")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "replay":
        try:
            count = replay_fallback(args.run_dir, args.tracking_uri)
        except RuntimeError as exc:  # unreachable store, or a live process holds the folder
            print(f"error: {exc}")
            return 1
        print(f"delivered {count} ops from {Path(args.run_dir) / FALLBACK_FILE}")
        return 0
    count = sync_pending(args.root, tracking_uri=args.tracking_uri, budget_s=args.budget_s)
    left = len(pending_stage_runs(args.root))
    print(f"synced {count} stage runs of {args.root}; {left} still pending")
    return 1 if left else 0


if __name__ == "__main__":
    raise SystemExit(main())

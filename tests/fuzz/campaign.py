"""A long fuzz campaign against a freshly started stack (what `make fuzz` runs):

    python -m tests.fuzz.campaign --examples 1000 [--seed 1] [--out bench/results/fuzz.json]

Prints cases per RPC and status, broken promises (crashes), replica restarts and cross-session failures, with
the smallest case of each kind; writes the same as JSON. Exits 1 when any of them is not zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.app.serve_env import use_local_cluster_env
from tests.fuzz.harness import run_campaign
from tests.golden import GoldenSet
from tests.stack import serve_stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000, help="cases to draw (default 1000)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: derandomized)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fuzz.json"))
    parser.add_argument("--model-dir", default=None, help="checkpoint to serve (default: the golden tiny one)")
    args = parser.parse_args(argv)

    model_dir = args.model_dir or str(GoldenSet().checkpoint)
    with serve_stack(model_dir) as app:
        report = run_campaign(app, args.examples, args.seed)
    print(report.summary())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seed": args.seed, "model_dir": model_dir, **report.as_dict()}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if report.clean else 1


if __name__ == "__main__":
    use_local_cluster_env()
    sys.exit(main())

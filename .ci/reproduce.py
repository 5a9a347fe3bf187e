"""CI: recompute a few committed cells from scratch and compare them with the committed results.

The published leaderboard is computed outside CI (three seeds of the full cross product
take about half an hour on 2 cores) and committed as result files under
leaderboard/store/results/. `mmbench leaderboard --check` proves that those files
carry the keys of the current code; this script proves that the code still produces
their figures: it reruns the cheapest informative cells of seed 0 into a fresh store
and compares every figure. Every stage runs single-threaded on a CPU (a base model
pretrained with 2 threads instead of 1 once moved BadNets' merged ASR by 6 points), so
the thread count cannot matter; another CPU or torch build may still order float
reductions differently, so figures must agree within TOLERANCE, not to the bit.

usage: python .ci/reproduce.py STORE [--attack NAME ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOLERANCE = 0.02          # absolute, on fractions: 2 points of ACC or ASR
FIGURES = ("acc", "normalized_acc", "asr", "dev_acc", "standalone_acc", "standalone_asr")
COMMITTED = Path(__file__).resolve().parent.parent / "leaderboard" / "store"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("store", help="a fresh store to compute into")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attack", action="append", default=None)
    parser.add_argument("--merger", action="append", default=None)
    args = parser.parse_args()
    attacks = args.attack or ["none", "badnets"]
    mergers = args.merger or ["ta"]

    from mmbench.cli import main as mmbench

    print(f"reproduce: {len(attacks) * len(mergers)} cells of seed {args.seed}, recomputed from scratch")
    argv = ["run", "--preset", args.preset, "--seed", str(args.seed), "--defense", "none",
            "--store", args.store, "--quiet", "--jobs", "2"]
    for name in attacks:
        argv += ["--attack", name]
    for name in mergers:
        argv += ["--merger", name]
    status = mmbench(argv)
    if status:
        print(f"reproduce: mmbench run exited {status}", file=sys.stderr)
        return 1
    problems, compared = [], 0
    for attack in attacks:
        for merger in mergers:
            cell = f"{attack}__{merger}__none__seed{args.seed}.json"
            committed = COMMITTED / "results" / args.preset / cell
            fresh = Path(args.store) / "results" / args.preset / cell
            if not committed.exists():
                problems.append(f"{cell}: no committed result")
                continue
            old, new = json.loads(committed.read_text()), json.loads(fresh.read_text())
            if old.get("key") != new.get("key"):
                problems.append(f"{cell}: key {new.get('key', '')[:12]} differs from the committed "
                                f"{old.get('key', '')[:12]}")
            for name in FIGURES:
                a, b = (old.get("metrics") or {}).get(name), (new.get("metrics") or {}).get(name)
                if a is None and b is None:
                    continue
                compared += 1
                if a is None or b is None or abs(a - b) > TOLERANCE:
                    problems.append(f"{cell}: {name} committed {a} vs recomputed {b}")
                else:
                    print(f"reproduce: {cell} {name}: committed {100 * a:.2f} recomputed {100 * b:.2f}")
    for line in problems:
        print(f"reproduce: MISMATCH {line}", file=sys.stderr)
    print(f"reproduce: {compared} figures compared, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

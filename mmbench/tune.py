"""``mmbench tune``: choose a plugin's hyperparameters the way the party using it could.

Every value a preset sets must come from a rule that uses only what the choosing
party can know, on the dev split, never on a test split (docs/presets.md,
"Selection rules"). This module runs those rules and prints the dev figures they
produced, so a preset's values can be re-derived by anyone:

* **merger** — the merger's user knows clean accuracy and nothing of a backdoor.
  For each grid point the preset's *clean* task vectors (attack ``none``) are
  merged and evaluated on every task's **dev** split; each task's dev accuracy is
  divided by its fine-tuned model's dev accuracy and averaged over tasks, then
  over seeds. The rule picks the highest mean normalised dev ACC (ties: the first
  grid point in the order given). This is the task-arithmetic papers' procedure
  (the scaling coefficient chosen on held-out validation accuracy).
* **attack** — the attacker knows its own task's data only. For each grid point
  the backdoored model alone (θ_pre + τ_adv) is evaluated on the attacked task's
  **dev** split: dev ACC, dev ASR (target-class samples excluded), and the clean
  twin's dev ACC. The rule picks the first grid point, in the order given, whose
  mean dev ASR reaches ``--asr-target`` while its dev ACC stays within
  ``--acc-tolerance`` of the clean twin's; if none does, the one with the highest
  dev ASR. Give the grid in the order the attacker prefers (e.g. the least
  poisoning first).

Nothing here reads a test split, and nothing is stored as a cell result: the
stages it needs (fine-tunes, attack artifacts) are cached in the store like any
run's, so a later ``mmbench run`` with the chosen values reuses them.
"""
from __future__ import annotations

import itertools
import json
import math
from typing import Any, Callable

from .plugins import UsageError


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["lambda=0.3,0.5", "k=0.2"]`` → {"lambda": [0.3, 0.5], "k": [0.2]} (values as JSON, else strings)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, eq, values = item.partition("=")
        if not eq or not name or not values:
            raise UsageError(f"--grid wants PARAM=V1,V2,..., got {item!r}")
        parsed = []
        for value in values.split(","):
            try:
                parsed.append(json.loads(value))
            except ValueError:
                parsed.append(value)
        grid[name] = parsed
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def choose_merger(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the highest mean normalised dev ACC (first in grid order on ties)."""
    best = rows[0]
    for row in rows[1:]:
        if row["dev_normalized_acc"] > best["dev_normalized_acc"]:
            best = row
    return best


def choose_attack(rows: list[dict[str, Any]], asr_target: float, acc_tolerance: float) -> dict[str, Any]:
    """The first row (grid order) with mean dev ASR ≥ ``asr_target`` and dev ACC within
    ``acc_tolerance`` of the clean twin's; otherwise the row with the highest dev ASR."""
    for row in rows:
        if row["dev_asr"] >= asr_target and row["dev_acc"] >= row["clean_dev_acc"] - acc_tolerance:
            return row
    best = rows[0]
    for row in rows[1:]:
        if row["dev_asr"] > best["dev_asr"]:
            best = row
    return best


class Tuner:
    """Runs a grid for one plugin on the dev split, over the given seeds."""

    def __init__(self, registry, preset, store, device, seeds: list[int],
                 base_overrides: dict[str, dict[str, Any]] | None = None,
                 echo: Callable[[str], None] = lambda m: None) -> None:
        from .context import SharedStages

        self.registry = registry
        self.preset = preset
        self.store = store
        self.device = device
        self.seeds = seeds
        self.base_overrides = base_overrides or {}
        self.echo = echo
        self.shared = SharedStages(preset, store, device, quiet=True, echo=echo)
        self._finetuned_dev: dict[int, dict[str, float]] = {}

    def worker(self, kind: str, name: str, overrides: dict[str, dict[str, Any]]):
        """A worker on the graph of (``name``, the first merger and defense) with ``overrides``
        (checked like --set), sharing this tuner's loaded stages across the grid."""
        from .execute import Runtime, Worker
        from .graph import default_names, plan

        pick = {k: [name] if k == kind else default_names(self.registry, k, self.preset)[:1]
                for k in ("attack", "merger", "defense")}
        graph = plan(self.registry, self.preset, pick["attack"], pick["merger"], pick["defense"], self.seeds,
                     overrides)
        worker = Worker(graph, Runtime(str(self.store.root), str(self.device), quiet=True), registry=self.registry,
                        echo=self.echo)
        worker.shared = self.shared  # one set of loaded stages for the whole grid
        return worker

    def overrides(self, name: str, point: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out = {k: dict(v) for k, v in self.base_overrides.items()}
        out.setdefault(name, {}).update(point)
        return out

    def finetuned_dev(self, seed: int) -> dict[str, float]:
        from .context import RunContext

        if seed not in self._finetuned_dev:
            ctx = RunContext(self.shared, seed)
            self._finetuned_dev[seed] = {t: ctx.accuracy(ctx.clean_finetune(t), t, split="dev")
                                         for t in self.preset.task_names}
        return self._finetuned_dev[seed]

    def merger(self, name: str, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from .context import RunContext

        reg = self.registry.get("merger", name)
        rows = []
        for point in points:
            params = self.worker("merger", name, self.overrides(name, point)).graph.params[("merger", name)]
            per_seed = []
            for seed in self.seeds:
                ctx = RunContext(self.shared, seed)
                pre = ctx.pretrained()
                vectors = {t: ctx.task_vector(t) for t in self.preset.task_names}
                merged = reg.obj.merge(pre, vectors, ctx.bind((reg.name, reg.distribution, reg.key_version)),
                                       dict(params))
                finetuned = self.finetuned_dev(seed)
                acc = {t: ctx.accuracy(merged.weights, t, split="dev") for t in self.preset.task_names}
                norm = {t: acc[t] / finetuned[t] if finetuned[t] else 0.0 for t in acc}
                per_seed.append({"seed": seed, "dev_acc": _mean(list(acc.values())),
                                 "dev_normalized_acc": _mean(list(norm.values())), "dev_acc_per_task": acc})
            rows.append({"point": point, "per_seed": per_seed,
                         "dev_acc": _mean([s["dev_acc"] for s in per_seed]),
                         "dev_normalized_acc": _mean([s["dev_normalized_acc"] for s in per_seed])})
            self.echo(f"  {name} {json.dumps(point)}: dev ACC {100 * rows[-1]['dev_acc']:.1f}, "
                      f"dev norm ACC {100 * rows[-1]['dev_normalized_acc']:.1f}")
        return rows

    def attack(self, name: str, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = []
        for point in points:
            worker = self.worker("attack", name, self.overrides(name, point))  # validates the point like --set
            per_seed = []
            for seed in self.seeds:
                result = worker.attack(name, seed)
                # the attack stage already measured the backdoored model alone on the dev split
                alone = result.info.get("standalone") or {}
                if "dev_asr" not in alone:  # an attack artifact stored before these figures existed
                    from .context import RunContext

                    alone = worker.standalone(RunContext(self.shared, seed), result)
                per_seed.append({"seed": seed, "dev_acc": alone["dev_acc"], "dev_asr": alone["dev_asr"],
                                 "clean_dev_acc": self.finetuned_dev(seed)[result.task]})
            rows.append({"point": point, "per_seed": per_seed,
                         **{k: _mean([s[k] for s in per_seed]) for k in ("dev_acc", "dev_asr", "clean_dev_acc")}})
            self.echo(f"  {name} {json.dumps(point)}: dev ACC {100 * rows[-1]['dev_acc']:.1f} "
                      f"(clean twin {100 * rows[-1]['clean_dev_acc']:.1f}), dev ASR {100 * rows[-1]['dev_asr']:.1f}")
        return rows


def render(kind: str, name: str, rows: list[dict[str, Any]], chosen: dict[str, Any], seeds: list[int]) -> str:
    from tabulate import tabulate

    names = list(rows[0]["point"])
    if kind == "merger":
        header = names + ["dev ACC", "dev norm ACC"] + [f"norm seed {s}" for s in seeds] + ["chosen"]
        body = [[r["point"][n] for n in names] + [f"{100 * r['dev_acc']:.1f}", f"{100 * r['dev_normalized_acc']:.1f}"]
                + [f"{100 * s['dev_normalized_acc']:.1f}" for s in r["per_seed"]] + ["◀" if r is chosen else ""]
                for r in rows]
    else:
        header = names + ["dev ACC", "clean twin dev ACC", "dev ASR"] + [f"ASR seed {s}" for s in seeds] + ["chosen"]
        body = [[r["point"][n] for n in names] + [f"{100 * r['dev_acc']:.1f}", f"{100 * r['clean_dev_acc']:.1f}",
                                                 f"{100 * r['dev_asr']:.1f}"]
                + [f"{100 * s['dev_asr']:.1f}" for s in r["per_seed"]] + ["◀" if r is chosen else ""]
                for r in rows]
    return (f"{kind} {name}, seeds {', '.join(map(str, seeds))} (dev split only; figures in %):\n"
            + tabulate(body, headers=header, tablefmt="github")
            + f"\nchosen: {json.dumps(chosen['point'])}")

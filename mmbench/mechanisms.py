"""``mmbench mechanisms``: measure what the papers' findings rest on, on one preset and seed.

Three measurements, each on the test split (they report; nothing is chosen from them):

* **Backdoor-vector geometry** (the Backdoor Vectors paper's transfer analysis): a backdoor
  vector is BV = θ_backdoored − θ_clean of one task and seed. BadNets fine-tunes with the
  preset's poisoning are made for the attacker's own setting and for one change at a time —
  another target class, the trigger in another corner, another task — and IBVS's injected
  BV is the defender's (its own task, corner, checkerboard phase and poison rate). The
  table is their pairwise cosine similarity. IBVS can only remove the attacker's backdoor to
  the extent that the defender's BV points the same way.
* **Dilution by the merge coefficient** (BadMerging's argument): task arithmetic
  θ_pre + λ Σ_t τ_t with the attacker's backdoored vector, for λ from 0.1 to 1.0: ASR on the
  target task and the mean ACC over tasks.
* **Dilution by the number of merged tasks**: the attacker's vector merged with the first
  k − 1 other tasks' clean vectors (preset order), k = 1 … all, at the preset's TA λ.
* **Which task moves the ASR** (``--part task-order [--attack NAME]``): at the preset's TA λ,
  the attack's ASR with the attacker and each other task alone, and with every task but one.
* **Clean task arithmetic: scaling against interference** (``--part clean-ta``, no attack):
  for each task t, the ACC of the base model, of θ_pre + λ·τ_t alone and of the clean TA
  merge θ_pre + λ·Σ τ, at the preset's TA λ and at 1.0, with the cosines of the clean task
  vectors. What θ_pre + λ·τ_t alone loses against the fine-tune is the price of scaling a
  task vector down; what the merge loses beyond that is the other tasks' interference.

Every fine-tune is a cached stage (the same keys as a run's), so this reuses a leaderboard
run's stages and a rerun is fast.
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Callable

from .plugins import UsageError

LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def cosine(a: dict, b: dict) -> float:
    """Cosine similarity of two state dicts flattened over their common keys."""
    dot = na = nb = 0.0
    for k in a:
        if k in b:
            x, y = a[k].double().flatten(), b[k].double().flatten()
            dot += float(x @ y)
            na += float(x @ x)
            nb += float(y @ y)
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else math.nan


def clean_ta(registry, preset, store, device, seed: int,
             echo: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Clean task arithmetic, per task: base, θ_pre + λ·τ_t alone, the TA merge, at the
    preset's λ and 1.0; and the clean task vectors' pairwise cosines and norms."""
    import torch

    from .context import RunContext
    from .execute import Runtime, Worker
    from .graph import default_names, plan

    if "ta" not in registry.names("merger"):
        raise UsageError("mechanisms needs the merger 'ta', which is not installed")
    graph = plan(registry, preset, ["none"], ["ta"], [default_names(registry, "defense", preset)[0]], [seed], {}, detectors=[])
    w = Worker(graph, Runtime(str(store.root), str(device), quiet=True), registry=registry, echo=echo)
    ctx = RunContext(w.shared, seed)
    tasks = preset.task_names
    pre = ctx.pretrained()
    tv = {t: ctx.task_vector(t) for t in tasks}
    ta_lambda = float(graph.params[("merger", "ta")]["lambda"])
    per_task: dict[str, dict[str, float]] = {t: {"base": w.shared.accuracy(pre, t, "test"),
                                                  "finetuned": w.shared.accuracy(ctx.clean_finetune(t), t, "test")}
                                             for t in tasks}
    with torch.no_grad():
        for lam in dict.fromkeys((ta_lambda, 1.0)):
            echo(f"  clean TA at λ {lam}")
            merged = {k: pre[k] + lam * sum(tv[t][k] for t in tasks) if k in tv[tasks[0]] else pre[k] for k in pre}
            for t in tasks:
                alone = {k: pre[k] + lam * tv[t][k] if k in tv[t] else pre[k] for k in pre}
                per_task[t][f"alone@{lam:g}"] = w.shared.accuracy(alone, t, "test")
                per_task[t][f"merged@{lam:g}"] = w.shared.accuracy(merged, t, "test")
    cos = [[cosine(tv[a], tv[b]) for b in tasks] for a in tasks]
    norms = {t: math.sqrt(sum(float(v.double().pow(2).sum()) for v in tv[t].values())) for t in tasks}
    return {"preset": preset.name, "seed": seed, "ta_lambda": ta_lambda, "tasks": list(tasks),
            "per_task": per_task, "cosine": cos, "norms": norms}


def _ta_figures(shared, pre: dict, vectors: dict, lam: float, use: list[str], attack) -> dict[str, float]:
    """ASR of ``attack`` (its trigger on its target task) and mean test ACC over ``use`` of the
    task-arithmetic merge θ_pre + λ·Σ_{t ∈ use} vectors[t] (tensors without a vector kept)."""
    weights = {k: pre[k] + lam * sum(vectors[t][k] for t in use) if k in vectors[use[0]] else pre[k] for k in pre}
    hit, total = shared.asr_counts(weights, attack.target_task or attack.task, attack.trigger,
                                   attack.target_class, "test")
    accs = [shared.accuracy(weights, t, "test") for t in use]
    return {"asr": hit / total, "acc": sum(accs) / len(accs)}


def task_order(registry, preset, store, device, seed: int, attack: str = "badnets",
               echo: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Which clean task moves the attack's ASR under task arithmetic (``--part task-order``).

    At the preset's TA λ, with the attack's stored upload (one vector, the attacker's task):
    ASR and mean ACC of the attacker alone, of the attacker with each other task alone (pairs),
    of every task merged, and of every task but one (leave-one-out); with the cosine of each
    clean task vector with the attack's backdoor vector BV = τ_attacker − τ_clean of its task.
    The sweep over the number of merged tasks adds tasks in preset order, so a rise at one K
    is either that task's own effect (it shows in its pair and its leave-one-out) or an
    interaction (it does not)."""
    import torch

    from .context import RunContext
    from .execute import Runtime, Worker
    from .graph import plan

    if "ta" not in registry.names("merger"):
        raise UsageError("mechanisms needs the merger 'ta', which is not installed")
    if attack == "none" or attack not in registry.names("attack"):
        from .plugins import unknown_name
        raise unknown_name("attack", attack, registry.names("attack"))
    graph = plan(registry, preset, [attack], ["ta"], ["none"], [seed], {}, detectors=[])
    w = Worker(graph, Runtime(str(store.root), str(device), quiet=True), registry=registry, echo=echo)
    ctx = RunContext(w.shared, seed)
    tasks = list(preset.task_names)
    pre = ctx.pretrained()
    clean = {t: ctx.task_vector(t) for t in tasks}
    result = w.attack(attack, seed)
    if result.contributions:
        raise UsageError(f"--part task-order takes an attack with one upload; {attack} uploads to "
                         f"{1 + len(result.contributions)} tasks")
    vectors = dict(clean)
    vectors[result.task] = result.task_vector
    bv = {k: v - clean[result.task][k] for k, v in result.task_vector.items()}
    lam = float(graph.params[("merger", "ta")]["lambda"])
    others = [t for t in tasks if t != result.task]

    def figures(use: list[str]) -> dict[str, Any]:
        return {"tasks": use, **_ta_figures(w.shared, pre, vectors, lam, use, result)}

    with torch.no_grad():
        echo("  the attacker alone and every task")
        alone, everything = figures([result.task]), figures([result.task, *others])
        pairs, without = {}, {}
        for t in others:
            echo(f"  with and without {t}")
            pairs[t] = figures([result.task, t])
            without[t] = figures([result.task, *[o for o in others if o != t]])
    return {"preset": preset.name, "seed": seed, "attack": attack, "task": result.task, "lambda": lam,
            "alone": alone, "all": everything, "pairs": pairs, "without": without,
            "cosine_with_bv": {t: cosine(clean[t], bv) for t in others}}


def task_order_text(report: dict[str, Any]) -> str:
    from tabulate import tabulate

    a, every = report["alone"], report["all"]
    rows = [[t, f"{report['cosine_with_bv'][t]:+.3f}", f"{100 * p['asr']:.1f}", f"{100 * (p['asr'] - a['asr']):+.1f}",
             f"{100 * report['without'][t]['asr']:.1f}", f"{100 * (every['asr'] - report['without'][t]['asr']):+.1f}"]
            for t, p in report["pairs"].items()]
    return "\n".join([
        f"# Which task moves the ASR: {report['attack']} on {report['task']}, TA λ {report['lambda']:g}, "
        f"preset {report['preset']}, seed {report['seed']}", "",
        f"attacker alone: ASR {100 * a['asr']:.1f} %, ACC {100 * a['acc']:.1f} %; every task: ASR "
        f"{100 * every['asr']:.1f} %, mean ACC {100 * every['acc']:.1f} %", "",
        tabulate(rows, headers=["task t", "cos(τ_t, BV)", "ASR attacker + t %", "vs alone",
                                "ASR all but t %", "t's part in all"], tablefmt="github", disable_numparse=True)])


LINEAR = ("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")


def regmean(registry, preset, store, device, seed: int,
            echo: Callable[[str], None] = lambda m: None,
            attacks: tuple[str, ...] = ("badmerging", "badtv")) -> dict[str, Any]:
    """Where a backdoor's ASR goes under RegMean: the plain RegMean merge against task
    arithmetic at the preset's λ, the plain mean (TA at 1/K), and two hybrids that take the
    linear layers RegMean solves from one merge and every other tensor from the other. Test
    ACC (mean over tasks) and ASR of each, per attack; nothing here chooses anything."""
    import torch

    from .context import RunContext
    from .execute import Runtime, Worker
    from .graph import default_names, plan

    for kind, name in (("merger", "regmean"), ("merger", "ta")):
        if name not in registry.names(kind):
            raise UsageError(f"mechanisms --part regmean needs the {kind} {name!r}, which is not installed")
    out: dict[str, Any] = {"preset": preset.name, "seed": seed, "attacks": {}}
    for attack in attacks:
        if attack not in registry.names("attack"):
            continue
        graph = plan(registry, preset, [attack], ["regmean"], [default_names(registry, "defense", preset)[0]], [seed], {},
                     detectors=[])
        w = Worker(graph, Runtime(str(store.root), str(device), quiet=True), registry=registry, echo=echo)
        ctx = RunContext(w.shared, seed)
        result = w.attack(attack, seed)
        pre = ctx.pretrained()
        vectors = {t: ctx.task_vector(t) for t in preset.task_names}
        vectors[result.task] = result.task_vector
        reg = registry.get("merger", "regmean")
        bound = ctx.bind((reg.name, reg.distribution, reg.key_version))
        lam = float(plan(registry, preset, ["none"], ["ta"], [default_names(registry, "defense", preset)[0]], [seed], {},
                         detectors=[]).params[("merger", "ta")]["lambda"])
        with torch.no_grad():
            merged = reg.obj.merge(pre, vectors, bound, dict(graph.params[("merger", "regmean")])).weights
            ta = {k: pre[k] + lam * sum(v[k] for v in vectors.values()) for k in pre}
            mean = {k: pre[k] + sum(v[k] for v in vectors.values()) / len(vectors) for k in pre}
            linear = {k for k in pre if k.endswith(LINEAR) or k == "proj"}
            variants = {
                f"ta λ {lam:g}": ta,
                "regmean": merged,
                f"regmean linear + ta λ {lam:g} rest": {k: merged[k] if k in linear else ta[k] for k in pre},
                f"ta λ {lam:g} linear + mean rest": {k: ta[k] if k in linear else mean[k] for k in pre},
                f"mean (ta λ 1/{len(vectors)})": mean,
            }
            figures = {}
            for name, weights in variants.items():
                echo(f"  {attack}: {name}")
                figures[name] = {
                    "acc": sum(ctx.accuracy(weights, t) for t in preset.task_names) / len(preset.task_names),
                    "asr": ctx.attack_success_rate(weights, result.target_task, result.trigger, result.target_class)}
        out["attacks"][attack] = figures
    return out


def regmean_text(report: dict[str, Any]) -> str:
    from tabulate import tabulate

    lines = [f"# Backdoors under RegMean: {report['preset']}, seed {report['seed']} (test, %)", ""]
    for attack, figures in report["attacks"].items():
        rows = [[name, f"{100 * f['acc']:.1f}", f"{100 * f['asr']:.1f}"] for name, f in figures.items()]
        lines += [f"## {attack}", "", tabulate(rows, headers=["merge", "ACC", "ASR"], tablefmt="github",
                                               disable_numparse=True), ""]
    return "\n".join(lines).rstrip()


def clean_ta_text(report: dict[str, Any]) -> str:
    from tabulate import tabulate

    tasks = report["tasks"]
    cols = list(report["per_task"][tasks[0]])
    lines = [f"# Clean task arithmetic: {report['preset']}, seed {report['seed']} (test ACC %)", ""]
    rows = [[t, *[f"{100 * report['per_task'][t][c]:.1f}" for c in cols]] for t in tasks]
    mean = ["mean", *[f"{100 * sum(report['per_task'][t][c] for t in tasks) / len(tasks):.1f}" for c in cols]]
    lines.append(tabulate(rows + [mean], headers=["task", *cols], tablefmt="github", disable_numparse=True))
    off = [report["cosine"][i][j] for i in range(len(tasks)) for j in range(len(tasks)) if i < j]
    lines += ["", f"Clean task vectors: pairwise cosine {min(off):+.3f} to {max(off):+.3f} (mean {sum(off) / len(off):+.3f}); "
              "norms " + ", ".join(f"{t} {n:.2f}" for t, n in report["norms"].items())]
    return "\n".join(lines)


def measure(registry, preset, store, device, seed: int,
            echo: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The backdoor measurements of this module's docstring, as JSON-able data."""
    import torch

    from .context import RunContext
    from .execute import Runtime, Worker
    from .graph import plan

    for kind, name in (("attack", "badnets"), ("merger", "ta"), ("defense", "ibvs")):
        if name not in registry.names(kind):
            raise UsageError(f"mechanisms needs the {kind} {name!r}, which is not installed")
    tasks = preset.task_names
    adversary = preset.adversary_task
    defender_task = tasks[-1]
    corner = {"bottom-right": "top-left"}

    shared: list[Any] = []  # one set of loaded stages for every worker

    def worker(badnets: dict[str, Any]) -> Worker:
        graph = plan(registry, preset, ["badnets"], ["ta"], ["ibvs"], [seed], {"badnets": badnets} if badnets else {})
        w = Worker(graph, Runtime(str(store.root), str(device), quiet=True), registry=registry, echo=echo)
        if not shared:
            shared.append(w.shared)
        w.shared = shared[0]
        return w

    base = worker({})
    ctx = RunContext(base.shared, seed)
    pre = ctx.pretrained()
    clean = {t: ctx.task_vector(t) for t in tasks}
    attacker = base.attack("badnets", seed)
    position = base.graph.params[("attack", "badnets")]["position"]
    variants: dict[str, dict[str, Any]] = {
        "attacker": {},
        "other target": {"target_class": 1 if attacker.target_class != 1 else 2},
        "other corner": {"position": corner.get(position, "bottom-right")},
        "other task": {"task": defender_task if defender_task != adversary else tasks[0]},
    }
    bvs: dict[str, dict] = {}
    described: dict[str, dict[str, Any]] = {}
    for label, change in variants.items():
        echo(f"  backdoor vector: {label}")
        result = attacker if not change else worker(change).attack("badnets", seed)
        bvs[label] = {k: v - clean[result.task][k] for k, v in result.task_vector.items()}
        described[label] = {"task": result.task, "target_class": result.target_class,
                            "position": change.get("position", position),
                            "standalone_asr": result.info["standalone"]["asr"]}
    # the defender's injected BV, exactly as the ibvs defense makes it (a cached stage)
    reg = registry.get("defense", "ibvs")
    ibvs_params = dict(base.graph.params[("defense", "ibvs")])
    bound = RunContext(base.shared, seed).bind((reg.name, reg.distribution, reg.key_version))
    # the one place the harness calls into a plugin's module: this tool measures the ibvs
    # plugin's own injected vector, which its hooks do not expose
    module = importlib.import_module(type(reg.obj).__module__)
    if not hasattr(module, "injection_vector"):
        raise UsageError(f"the installed ibvs ({module.__name__}) has no injection_vector to measure")
    bv_inj, inj_info = module.injection_vector(bound, ibvs_params)
    bvs["defender (IBVS)"] = bv_inj
    described["defender (IBVS)"] = {"task": inj_info["task"], "target_class": inj_info["target_class"],
                                    "position": inj_info["position"],
                                    "standalone_asr": inj_info["injection"]["asr"]}
    names = list(bvs)
    matrix = [[cosine(bvs[a], bvs[b]) for b in names] for a in names]
    norms = {n: math.sqrt(sum(float(v.double().pow(2).sum()) for v in bvs[n].values())) for n in names}
    clean_cos = {n: cosine(bvs[n], clean[described[n]["task"]]) for n in names}

    # dilution: λ and the number of tasks, task arithmetic with the attacker's vector
    vectors = dict(clean)
    vectors[attacker.task] = attacker.task_vector

    def figures(lam: float, use: list[str]) -> dict[str, float]:
        return _ta_figures(base.shared, pre, vectors, lam, use, attacker)

    with torch.no_grad():
        by_lambda = []
        for lam in LAMBDAS:
            echo(f"  TA λ {lam}")
            by_lambda.append({"lambda": lam, **figures(lam, list(tasks))})
        ta_lambda = float(base.graph.params[("merger", "ta")]["lambda"])
        others = [t for t in tasks if t != attacker.task]
        by_tasks = []
        for k in range(1, len(tasks) + 1):
            use = [attacker.task, *others[:k - 1]]
            echo(f"  {k} task(s)")
            by_tasks.append({"tasks": k, "lambda": ta_lambda, **figures(ta_lambda, use)})
    return {"preset": preset.name, "seed": seed, "backdoor_vectors": described, "names": names,
            "cosine": matrix, "norms": norms, "cosine_with_clean_task_vector": clean_cos,
            "asr_by_lambda": by_lambda, "asr_by_tasks": by_tasks}


def text(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    from tabulate import tabulate

    names = report["names"]
    lines = [f"# Mechanisms: {report['preset']}, seed {report['seed']}", "",
             "## Backdoor vectors (BV = θ_backdoored − θ_clean), pairwise cosine", ""]
    rows = [[n, f"{report['backdoor_vectors'][n]['task']}", report["backdoor_vectors"][n]["position"],
             report["backdoor_vectors"][n]["target_class"], f"{100 * report['backdoor_vectors'][n]['standalone_asr']:.1f}",
             f"{report['norms'][n]:.3f}", f"{report['cosine_with_clean_task_vector'][n]:+.3f}"]
            + [f"{c:+.3f}" for c in row] for n, row in zip(names, report["cosine"])]
    lines.append(tabulate(rows, headers=["BV", "task", "corner", "target", "ASR alone %", "‖BV‖",
                                         "cos(BV, τ_task)", *names], tablefmt="github", disable_numparse=True))
    lines += ["", "## Task arithmetic with the attacker's vector: ASR and mean ACC against λ", ""]
    lines.append(tabulate([[r["lambda"], f"{100 * r['asr']:.1f}", f"{100 * r['acc']:.1f}"]
                           for r in report["asr_by_lambda"]],
                          headers=["λ", "ASR %", "mean ACC %"], tablefmt="github", disable_numparse=True))
    lines += ["", "## ... against the number of merged tasks (the attacker's first)", ""]
    lines.append(tabulate([[r["tasks"], r["lambda"], f"{100 * r['asr']:.1f}", f"{100 * r['acc']:.1f}"]
                           for r in report["asr_by_tasks"]],
                          headers=["tasks", "λ", "ASR %", "mean ACC %"], tablefmt="github", disable_numparse=True))
    return "\n".join(lines)

"""Merging at ViT-B-32 scale against the memory-bandwidth bound, peak memory against the inputs,
and how merge time grows with the number of tasks and the parameters per task.

Inputs are synthetic (benchmarks/common.py): θ_pre and 8 task vectors the shapes of open_clip
ViT-B-32's image encoder (≈ 87.8M float32 each, 152 tensors). The operations are the plugins'
own functions, single-threaded as in a stage:

- TA: ``mmbench.vectors.task_arithmetic`` (what the ``ta`` merger returns);
- TIES: ``ties_merge`` of the ``ties`` merger (k 0.2, sum, λ 0.3);
- IBVS: ``subtract_backdoor_vector`` (θ_merged − λ·BV_inj);
- DAM: ``masked_merge`` (θ_pre + m ⊙ Σ_k λ_k τ_k, the merge DAM runs every step), no grad.

The bound of an operation is the bytes it must read and write once (its inputs and its
output) ÷ the copy bandwidth measured in the same run (a copy of as many bytes between two
buffers whose pages are mapped, interleaved with the merge round by round).

Times are measured in a fresh interpreter, twice. The figure compared with the bound is
like for like: the operation writes its output into memory the previous round freed, as the
reference copy writes into mapped pages (``REUSE``: glibc told to keep freed memory in the
process, in one arena). The second interpreter keeps glibc's defaults, which hand each
round's freed output back to the kernel, so every round first-touches a fresh output (about
86k pages of 4 KiB at 8 × ViT-B-32; 1.2 to 11 µs a page in this VM, varying between runs
with the host): that time, its page faults and its kernel seconds are reported beside the
figure. The growth series (time against tasks and parameters) run in the first interpreter.

Peak memory is measured in a fresh interpreter holding only the operation's inputs: their
bytes plus what the operation adds above them (VmHWM, reset once the inputs are built), ÷ the
inputs' bytes.

``MMBENCH_BENCH_LAYERS=N`` scales the blocks down (12 = ViT-B-32) for a quick check.
"""
from __future__ import annotations

import gc
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (best_of, copy_bandwidth, nbytes, params, reset_peak, status_bytes, timed,  # noqa: E402
                    synthetic_weights, vit_shapes)

LAYERS = int(os.environ.get("MMBENCH_BENCH_LAYERS", "12"))
TASKS = 8
GIB = 2 ** 30
SECTION = "Merging at ViT-B-32 scale"
OPS = ("ta", "ties", "ibvs", "dam")
ROUNDS = 5  # timed rounds per operation and allocator, after one warm-up round
# glibc settings under which a round's output reuses the memory the previous round freed: freed
# blocks stay in the process (no trim; blocks up to 32 MiB, the most glibc allows, from the heap
# instead of their own mapping), and one arena, so TIES's worker thread allocates from the heap
# the main thread freed into (each new thread would otherwise take an arena of its own)
REUSE = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(32 * 2 ** 20),
         "MALLOC_TRIM_THRESHOLD_": str(2 ** 40)}
FIXES = {
    "ta": "`mmbench.vectors.task_arithmetic` clones θ_pre and then adds each τ_k into the whole output "
          "in turn: 2 + 3K passes over d floats where K + 2 suffice. Accumulate tensor by tensor in "
          "cache-sized chunks (out[chunk] = θ_pre[chunk] + λ·Σ_k τ_k[chunk]), so the output chunk stays in "
          "cache while the K task rows stream through once (in `mmbench/vectors.py`, fingerprinted).",
    "ties": "`ties_merge` runs its two passes (each task's trim threshold; elect + disjoint merge) in "
            "the compiled C kernel of `plugins/mergers/ties_kernel.py`, each reading every entry once "
            "(eagerly, where no C compiler is found: about 9× slower); the merge keeps a coordinate's K "
            "trimmed entries in registers (one block per K = 2..12), the threshold pass counts and packs "
            "64 entries a step with AVX-512 where the CPU has it, and both selections are radix "
            "selections in C. Two passes over K task vectors move 2K + 2 rows where the bound counts "
            "K + 2, so about 1.8× the bound is the floor of any two-pass TIES. Measured apart on a "
            "2-core AMD EPYC (8 × 87.8M): each threshold about 18 ms (the pass 14.4 ms where reading the "
            "task alone takes 13; sample and selections 3.3 ms), the merge into mapped memory 0.14–0.16 s "
            "(1.0–1.2× the bound). Tried and rejected: one pass that merges with the brackets' cuts and "
            "fixes the ~4 % of coordinates inside a bracket afterwards (bit-identical, 1.2–1.5 s: the "
            "scattered fix-up is latency-bound); huge pages for the output (0.02–0.38 s, erratic, TIES "
            "slower); populating each output tensor's pages ahead (MADV_POPULATE_WRITE: the same faults "
            "and time). A fresh output's first touch (about 86k pages of 4 KiB, 1.2 to 11 µs each in "
            "this VM) is shown beside the figure: the kernel's and the hypervisor's work, paid by any "
            "merge that returns new tensors.",
    "ibvs": "`subtract_backdoor_vector` subtracts in place into the merged weights (`sub_(bv, alpha=λ)`); "
            "a tensor that shares memory with θ_pre, a task vector or the BV is subtracted out of place "
            "(in `plugins/defenses/ibvs.py`).",
    "dam": "`masked_merge` stacks the K task vectors of one tensor at a time (so mask learning holds no "
           "stacked K·d copy for its whole run) and then materialises `tensordot(λ, τ)` and `mask * ...` as "
           "temporaries: the per-tensor stack is a K·d copy per merge. `torch.addcmul(θ_pre, mask, Σ_k λ_k τ_k)` "
           "with the sum accumulated task by task (no stack) would drop both (in `plugins/defenses/dam.py`, "
           "fingerprinted).",
}


def op_inputs(op: str, pre, vectors):
    """(callable, its inputs as state dicts, bytes read + written once)."""
    from mmbench.vectors import task_arithmetic
    from mmbench_plugins.defenses.dam import masked_merge
    from mmbench_plugins.defenses.ibvs import subtract_backdoor_vector
    from mmbench_plugins.mergers.ties import ties_merge

    d_bytes = nbytes(pre)
    k = len(vectors)
    if op == "ta":
        return (lambda: task_arithmetic(pre, vectors, 0.3)), [pre, *vectors.values()], (k + 2) * d_bytes
    if op == "ties":
        return (lambda: ties_merge(pre, vectors, k=0.2, merge="sum", lam=0.3, workers=1)), \
            [pre, *vectors.values()], (k + 2) * d_bytes
    if op == "ibvs":
        merged = {n: v + 0.3 * vectors["task0"][n] for n, v in pre.items()}
        bv = vectors["task1"]
        # in place into the merge, as the defense runs it (it owns the merged weights)
        return (lambda: subtract_backdoor_vector(merged, bv, 1.0, in_place=True)), [merged, bv], 3 * d_bytes
    if op == "dam":
        names = list(pre)
        stacked = {n: [vectors[t][n] for t in vectors] for n in names}  # stacked per tensor inside
        mask = {n: torch.rand_like(pre[n]).add_(0.5) for n in names}
        lambdas = torch.full((k,), 0.3)

        def run():
            with torch.no_grad():
                return masked_merge(pre, stacked, lambdas, mask)
        return run, [pre, *vectors.values(), mask], (k + 3) * d_bytes
    raise ValueError(op)


# --- peak memory, in a fresh interpreter -------------------------------------------------------------

def _measure_memory(op: str, layers: int, tasks: int) -> dict:
    torch.set_num_threads(1)
    import mmbench.vectors  # noqa: F401  (imports and torch's allocations before the baseline)
    import mmbench_plugins.defenses.dam  # noqa: F401
    import mmbench_plugins.defenses.ibvs  # noqa: F401
    import mmbench_plugins.mergers.ties  # noqa: F401
    torch.ones(1) + 1
    gc.collect()
    baseline = status_bytes("VmRSS")
    pre, vectors = synthetic_weights(tasks, layers)
    fn, inputs, _ = op_inputs(op, pre, vectors)
    del pre, vectors  # only the operation's own inputs stay alive
    gc.collect()
    input_bytes = nbytes(*inputs)
    rss = status_bytes("VmRSS")
    reset = reset_peak()
    out = fn()
    peak = status_bytes("VmHWM")
    del out
    return {"op": op, "input_bytes": input_bytes, "baseline": baseline, "rss_inputs": rss, "peak": peak,
            "reset": reset}


# --- time, in a fresh interpreter ------------------------------------------------------------------

def _rusage() -> tuple[float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


def _time_ops(layers: int, tasks: int, rounds: int, growth: bool) -> dict:
    """Each operation's rounds (its seconds, page faults and kernel seconds, and the reference
    copy's bound measured just before it), after one warm-up round; with ``growth``, the growth
    series too. Run under the allocator settings of the interpreter's environment."""
    torch.set_num_threads(1)
    pre, vectors = synthetic_weights(tasks, layers)
    # the reference: copying as many bytes (half read, half written) through a 256 MiB buffer
    n = 64 * 2 ** 20
    src, dst = torch.ones(n), torch.zeros(n)  # both touched: no page faults in the timed copies
    result: dict = {"params": params(pre)}
    for op in OPS:
        fn, inputs, moved = op_inputs(op, pre, vectors)
        reps = moved / (2 * 4 * n)

        def reference():
            for _ in range(math.ceil(reps)):
                dst.copy_(src)
        fn()  # warm-up: each timed round then finds memory that a round before it freed
        reference()
        measured = []
        for _ in range(rounds):
            gc.collect()
            bound = timed(reference) * reps / math.ceil(reps)
            system, faults = _rusage()
            seconds = timed(fn)  # the output is freed inside, as a caller that drops it
            system_after, faults_after = _rusage()
            measured.append({"seconds": seconds, "bound": bound, "faults": faults_after - faults,
                             "system": system_after - system})
        result[op] = {"moved": moved, "rounds": measured}
        if op == "ties":  # where the time goes: the per-task trim thresholds against the rest
            from mmbench_plugins.mergers import ties_kernel
            from mmbench_plugins.mergers.ties import task_threshold
            lib = ties_kernel.load()
            result[op]["thresholds"] = best_of(lambda: [task_threshold(v, 0.2, lib) for v in vectors.values()],
                                               rounds)
            result[op]["path"] = "the compiled kernel" if lib is not None else f"eager ({ties_kernel.why_not()})"
        del fn, inputs
        gc.collect()
    del src, dst
    if growth:
        result["growth"] = _growth(pre, vectors, layers)
    return result


def _growth(pre, vectors, layers: int) -> dict:
    """TA and TIES against the number of tasks (2, 4, 8, 16 at ¼ of the blocks) and the
    parameters per task (8 tasks, 1, 3, 6, 12 blocks: subsets of the full inputs); each point
    best of two rounds after a warm-up, against its copy bound at this interpreter's bandwidth."""
    from mmbench.vectors import task_arithmetic
    from mmbench_plugins.mergers.ties import ties_merge

    bandwidth = copy_bandwidth()

    def merge_times(p, vs):
        ta = lambda: task_arithmetic(p, vs, 0.3)  # noqa: E731
        ties = lambda: ties_merge(p, vs, k=0.2, merge="sum", lam=0.3, workers=1)  # noqa: E731
        ta()  # warm-up, as the merges' own figures
        ties()
        return best_of(ta, 2), best_of(ties, 2), (len(vs) + 2) * nbytes(p) / bandwidth

    small_layers = max(1, layers // 4)
    names = list(vit_shapes(small_layers))
    # tasks: 16 task vectors of the ¼-size encoder (the first 8 are subsets of the full inputs)
    gen = torch.Generator().manual_seed(1)
    small_pre = {n: pre[n] for n in names}
    many = {t: {n: v[n] for n in names} for t, v in vectors.items()}
    for k in range(len(many), 16):
        many[f"task{k}"] = {n: torch.randn(pre[n].shape, generator=gen).mul_(1e-3) for n in names}
    out: dict = {"small_params": params(small_pre), "counts": [2, 4, 8, 16], "tasks": {"TA": [], "TIES": [], "bound": []}}
    for k in out["counts"]:
        ta, ties, bound = merge_times(small_pre, dict(list(many.items())[:k]))
        for key, value in (("TA", ta), ("TIES", ties), ("bound", bound)):
            out["tasks"][key].append(value)
    del many
    gc.collect()
    out["sizes"], out["params"] = [], {"TA": [], "TIES": [], "bound": []}
    for blocks in sorted({1, small_layers, max(1, layers // 2), layers}):
        keep = list(vit_shapes(blocks))
        p = {n: pre[n] for n in keep}
        vs = {t: {n: v[n] for n in keep} for t, v in vectors.items()}
        ta, ties, bound = merge_times(p, vs)
        out["sizes"].append(params(p))
        for key, value in (("TA", ta), ("TIES", ties), ("bound", bound)):
            out["params"][key].append(value)
    return out


@pytest.fixture(scope="module")
def timings() -> dict:
    """``reused``: the output in memory a previous round freed (``REUSE``), with the growth
    series; ``fresh``: glibc's defaults, a fresh output every round."""
    def run(env: dict, growth: bool) -> dict:
        done = subprocess.run([sys.executable, __file__, "--time", str(LAYERS), str(TASKS), str(ROUNDS),
                               "growth" if growth else "-"], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    base = {k: v for k, v in os.environ.items() if k not in REUSE}
    base["OMP_NUM_THREADS"] = "1"
    return {"reused": run({**base, **REUSE}, True), "fresh": run(base, False)}


def _best(rounds: list[dict]) -> tuple[dict, float]:
    """(the fastest round, the least bound over the rounds): each the least disturbed."""
    return min(rounds, key=lambda r: r["seconds"]), min(r["bound"] for r in rounds)


@pytest.mark.parametrize("op", OPS)
def test_merge_time(perf, timings, op):
    reused, fresh = timings["reused"][op], timings["fresh"][op]
    best, bound = _best(reused["rounds"])
    best_fresh, bound_fresh = _best(fresh["rounds"])
    moved, subject = reused["moved"], best["seconds"]
    bandwidth = moved / bound
    fix = FIXES[op]
    if op == "ties":
        trim = reused["thresholds"]
        fix = (f"Measured here, with {reused['path']}: the {TASKS} trim thresholds (one streaming "
               f"pass per task) take {trim:.2f} s of the {subject:.2f} s; "
               f"elect and disjoint merge the other {max(subject - trim, 0):.2f} s "
               f"({max(subject - trim, 0) / bound:.1f}× the bound). " + fix)
    ratio = subject / bound
    d = timings["reused"]["params"]
    where = ("in place into the merged weights" if op == "ibvs"
             else "output in memory a previous round freed")
    note = (f"{where} ({best['faults']} page faults); with glibc's defaults (a fresh "
            f"output): {best_fresh['seconds']:.3f} s, {best_fresh['seconds'] / bound_fresh:.2f}× its bound "
            f"{bound_fresh:.3f} s, {best_fresh['faults']} page faults, {best_fresh['system']:.2f} s in the kernel"
            + ("" if LAYERS == 12 else f"; scaled down to {LAYERS} blocks"))
    perf.add(id=f"merge-{op}", section=SECTION,
             what=f"{op.upper() if op != 'ibvs' else 'IBVS subtraction'}{' masked merge' if op == 'dam' else ''}, "
                  f"{TASKS if op != 'ibvs' else 1} × {d / 1e6:.1f}M float32" + (" (merged, BV)" if op == "ibvs" else ""),
             measured=f"{subject:.3f} s", reference=f"bound {bound:.3f} s ({moved / GIB:.2f} GiB at "
                                                      f"{bandwidth / 1e9:.1f} GB/s copy)",
             ratio=ratio, ratio_label="× the bound", target="≤ 4×", ok=ratio <= 4, fix=fix, note=note)


@pytest.mark.parametrize("op", OPS)
def test_merge_peak_memory(perf, op):
    result = subprocess.run([sys.executable, __file__, "--memory", op, str(LAYERS), str(TASKS)],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    m = json.loads(result.stdout.strip().splitlines()[-1])
    if not m["reset"]:
        pytest.skip("VmHWM cannot be reset here (/proc/self/clear_refs): no peak-memory figure")
    # what the operation adds above its held inputs (VmHWM reset once they were built), plus the inputs
    peak = m["input_bytes"] + max(0, m["peak"] - m["rss_inputs"])
    ratio = peak / m["input_bytes"]
    fixes = {"ibvs": "The output alone is half the inputs (θ_merged and BV_inj are both d floats), so "
                     "1.5× is the floor for an out-of-place subtraction: subtract in place into the merged "
                     "weights the merger just returned (they belong to the defense), 1.0× (in "
                     "`plugins/defenses/ibvs.py`, fingerprinted)."}
    perf.add(id=f"peak-{op}", section=SECTION,
             what=f"{op.upper() if op != 'ibvs' else 'IBVS subtraction'}{' masked merge' if op == 'dam' else ''}: "
                  "peak memory", measured=f"{peak / GIB:.2f} GiB",
             reference=f"inputs {m['input_bytes'] / GIB:.2f} GiB", ratio=ratio, ratio_label="× the inputs",
             target="≤ 1.5×", ok=ratio <= 1.5,
             fix=fixes.get(op, "Merge chunk by chunk into a preallocated output; no whole-size temporaries."))


# --- how merge time grows -------------------------------------------------------------------------------

def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x): the exponent a of y ∝ x^a."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def test_merge_time_vs_tasks_and_params(perf, timings):
    """TA and TIES against the number of tasks and the parameters per task (``_growth``)."""
    g = timings["reused"]["growth"]
    counts, ta_t, ties_t, bound_t = g["counts"], g["tasks"]["TA"], g["tasks"]["TIES"], g["tasks"]["bound"]
    sizes, ta_p, ties_p, bound_p = g["sizes"], g["params"]["TA"], g["params"]["TIES"], g["params"]["bound"]
    d_small = g["small_params"]
    perf.add_series("merge-vs-tasks", x=counts, lines={"TA": ta_t, "TIES": ties_t}, bound=bound_t,
                    xlabel=f"task vectors merged ({d_small / 1e6:.1f}M params each)",
                    title=f"merge time vs tasks ({d_small / 1e6:.1f}M float32 per task)")
    perf.add_series("merge-vs-params", x=[s / 1e6 for s in sizes], lines={"TA": ta_p, "TIES": ties_p},
                    bound=bound_p, xlabel="parameters per task (millions)", title="merge time vs parameters (8 tasks)")
    # growth exponents: time ∝ tasks^a, params^b, fitted by least squares in log-log over every
    # point (not the slope between the two ends, which one noisy end point can swing): linear is 1
    # each point's time ÷ its copy bound (linear in the bytes) shows where a slope above 1 comes
    # from: a ratio that grows toward the large end is super-linear work, a small end near the
    # bound with a flat ratio after it is not
    for name, xs, ys, bounds in (("TA vs tasks", counts, ta_t, bound_t), ("TIES vs tasks", counts, ties_t, bound_t),
                                 ("TA vs parameters", sizes, ta_p, bound_p),
                                 ("TIES vs parameters", sizes, ties_p, bound_p)):
        if xs[-1] == xs[0]:
            continue
        slope = loglog_slope(xs, ys)
        over = ", ".join(f"{y / b:.2f}" for y, b in zip(ys, bounds))
        perf.add(id=f"growth-{name}", section="How cost grows", what=f"{name}: growth exponent",
                 measured=f"{ys[0]:.3f} s → {ys[-1]:.3f} s", reference=f"x {xs[0]:.3g} → {xs[-1]:.3g}",
                 ratio=slope, ratio_label="(least-squares log-log slope; 1 = linear)", target="≤ 1.1 (linear)", ok=slope <= 1.1,
                 note=f"time ÷ copy bound at each point: {over}",
                 fix="Growth above linear means a pass that is not streamed (a per-task sort or a stacked "
                     "K × d copy); see the merge's own entry above. Where the time ÷ bound ratios (the "
                     "note) are flat from the second point on, the slope comes from a small end that runs "
                     "nearer the bound, not from work that grows faster than the bytes.")


if __name__ == "__main__" and sys.argv[1:2] == ["--memory"]:
    print(json.dumps(_measure_memory(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
if __name__ == "__main__" and sys.argv[1:2] == ["--time"]:
    print(json.dumps(_time_ops(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "growth")))


def test_dam_learn_mask_memory_note(perf):
    """What DAM's mask learning holds at 8 × ViT-B-32, counted from the code (not measured: it needs
    ViT-B-32 forwards at 224 px, minutes on this CPU)."""
    d = sum(math.prod(s) for s in vit_shapes(12).values())
    k = TASKS
    inputs = (k + 1) * d * 4
    extra = 7 * d * 4
    perf.add_open("DAM's mask learning: what it holds beyond its inputs (counted from the code)",
                  f"`learn_mask` keeps per-tensor lists of the caller's K task vectors (no stacked K·d copy; "
                  f"`masked_merge` sums the K tasks into one buffer per tensor and frees it) and holds the mask logits, their "
                  f"gradient and Adam's two moments (4·d: the method's own state, a mask entry per task-vector "
                  f"entry trained with Adam), a sampled and a rescaled mask and the merged weights (3·d): at "
                  f"{k} × {d / 1e6:.1f}M float32 that is ≈ {extra / GIB:.1f} GiB above inputs of "
                  f"{inputs / GIB:.1f} GiB, {(inputs + extra) / inputs:.2f}× the inputs, before activations. "
                  "No target applies (the issue's 1.5× is for merges; DAM's masked merge meets it above); "
                  "the 3·d of sampled, rescaled and merged tensors is the part a per-tensor loop could "
                  "shrink, at the cost of one forward graph per tensor group.")

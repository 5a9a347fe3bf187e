"""TIES-Merging on hand-checkable tensors (plugins/mergers/ties.py)."""
import os
import shutil

import pytest
import torch

from mmbench.api import Merged, PluginError
from mmbench_plugins.mergers import ties


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- trim --------------------------------------------------------------------

def test_trim_keeps_every_entry_tied_at_the_threshold():
    # k=0.2 of 5 entries keeps 1, but |3| = |-3| are tied at the threshold: both stay
    task_vector = {"w": t(3, -3, 1, 0.5, 2)}
    assert ties.trim_threshold(task_vector, 0.2) == 3.0
    assert torch.equal(ties.trim(task_vector, 0.2)["w"], t(3, -3, 0, 0, 0))


def test_trim_is_global_over_the_task_not_per_layer():
    # the top half of 6 entries all sit in "big"; a per-layer trim would keep 0.3 and -0.2 of "small"
    task_vector = {"big": t(10, -9, 8), "small": t(0.1, -0.2, 0.3)}
    trimmed = ties.trim(task_vector, 0.5)
    assert torch.equal(trimmed["big"], t(10, -9, 8))
    assert torch.equal(trimmed["small"], t(0, 0, 0))


def test_trim_threshold_keeps_round_k_d_entries():
    task_vector = {"a": t(1, 2, 3, 4), "b": t(-5, 6, -7, 8, 9, 10)}
    assert ties.trim_threshold(task_vector, 0.3) == 8.0   # round(3.0) = 3 kept: 10, 9, 8
    assert ties.trim_threshold(task_vector, 0.25) == 9.0  # round(2.5) = 2 (banker's rounding): 10, 9
    assert ties.trim_threshold(task_vector, 0.01) == 10.0  # at least one entry survives
    assert ties.trim_threshold(task_vector, 1.0) == 0.0   # keep everything
    assert torch.equal(ties.trim(task_vector, 1.0)["a"], task_vector["a"])


def test_kth_largest_magnitude_is_exact():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1000, generator=g) * 1e-3, torch.randn(37, 11, generator=g),
               torch.tensor([0.0, -0.0, 1e-42, -1e-42, 5.0, -5.0, 5.0]),  # zeros, denormals, repeats
               torch.randn(500, generator=g).half()]
    magnitudes = torch.cat([x.reshape(-1).float().abs() for x in tensors]).sort(descending=True).values
    for k in (1, 2, 3, 4, 17, 500, 1000, magnitudes.numel() - 3, magnitudes.numel()):
        assert ties.kth_largest_magnitude(tensors, k) == float(magnitudes[k - 1]), k
    with pytest.raises(ValueError):
        ties.kth_largest_magnitude(tensors, 0)


# --- elect -------------------------------------------------------------------

def test_elect_is_the_sign_of_the_sum_not_of_the_majority_of_entries():
    trimmed = [{"w": t(1, -1)}, {"w": t(1, -1)}, {"w": t(-5, 3)}]
    assert torch.equal(ties.elect(trimmed)["w"], t(-1, 1))


def test_zero_sum_takes_the_majority_sign_of_the_whole_vector():
    # coordinate "a"[0] sums to 0; the other three coordinates elect -1, -1, +1: majority -1
    trimmed = [{"a": t(2, -1), "b": t(-1, 4)}, {"a": t(-2, -1), "b": t(-1, 0)}]
    signs = ties.elect(trimmed)
    assert torch.equal(signs["a"], t(-1, -1))
    assert torch.equal(signs["b"], t(-1, 1))
    merged = ties.disjoint_merge(trimmed, signs, "sum")
    assert torch.equal(merged["a"], t(-2, -2))  # only the entry agreeing with the majority sign
    assert torch.equal(merged["b"], t(-2, 4))


def test_zero_sum_with_a_positive_majority():
    trimmed = [{"w": t(2, 1, 0)}, {"w": t(-2, 1, 0)}]
    signs = ties.elect(trimmed)
    assert torch.equal(signs["w"], t(1, 1, 1))
    assert torch.equal(ties.disjoint_merge(trimmed, signs, "sum")["w"], t(2, 2, 0))


def test_zero_sum_merges_to_zero_when_the_majority_is_itself_zero():
    trimmed = [{"w": t(2, 1, -1)}, {"w": t(-2, 1, -1)}]
    signs = ties.elect(trimmed)
    assert torch.equal(signs["w"], t(0, 1, -1))
    assert torch.equal(ties.disjoint_merge(trimmed, signs, "sum")["w"], t(0, 2, -2))


# --- disjoint merge ------------------------------------------------------------

@pytest.mark.parametrize("merge, expected", [
    ("sum", t(6, -4, 0)),
    ("mean", t(2, -4, 0)),   # zeros do not count: 6 / 3 agreeing entries; 0 (not NaN) where none
    ("max", t(3, -4, 0)),    # the largest agreeing entry, with its sign
])
def test_sum_mean_max(merge, expected):
    trimmed = [{"w": t(3, 1, 0)}, {"w": t(1, -4, 0)}, {"w": t(2, 1, 0)}, {"w": t(0, 0, 0)}]
    signs = ties.elect(trimmed)
    assert torch.equal(signs["w"], t(1, -1, 0))  # Σ = (6, -2, 0); the majority of (+1, -1) is 0
    assert torch.equal(ties.disjoint_merge(trimmed, signs, merge)["w"], expected)


def test_unknown_merge_is_an_error():
    with pytest.raises(ValueError, match="merge"):
        ties.disjoint_merge([{"w": t(1)}], {"w": t(1)}, "median")


# --- the whole merge -------------------------------------------------------------

def test_ties_merge_by_hand():
    pretrained = {"w": t(1, 1, 1, 1), "b": t(0, 0)}
    task_vectors = {
        "A": {"w": t(4, -1, 0.5, 3), "b": t(0.1, -2)},  # k=0.5 of 6: keeps 4, 3, -2
        "B": {"w": t(-1, -6, 5, 0.2), "b": t(1, 0.3)},  # keeps -6, 5, 1
    }
    # trimmed A: w (4, 0, 0, 3), b (0, -2); B: w (0, -6, 5, 0), b (1, 0)
    # signs: w (+, -, +, +), b (+, -) ; sum: w (4, -6, 5, 3), b (1, -2)
    merged = ties.ties_merge(pretrained, task_vectors, k=0.5, merge="sum", lam=0.5)
    assert torch.equal(merged["w"], t(3, -2, 3.5, 2.5))
    assert torch.equal(merged["b"], t(0.5, -1))


def test_integer_buffers_are_skipped():
    pretrained = {"w": t(1, 1, 1), "steps": torch.tensor([7]), "ids": torch.arange(3)}
    task_vectors = {"A": {"w": t(1, -2, 3), "steps": torch.tensor([1000])},
                    "B": {"w": t(2, -3, -1), "steps": torch.tensor([-1000])}}
    merged = ties.ties_merge(pretrained, task_vectors, k=0.5, lam=1.0)
    # trimmed A (0, -2, 3), B (2, -3, 0); were "steps" counted it would take a place in each trim
    assert torch.equal(merged["w"], t(1 + 2, 1 - 5, 1 + 3))
    assert merged["steps"].dtype == torch.int64 and torch.equal(merged["steps"], torch.tensor([7]))
    assert torch.equal(merged["ids"], torch.arange(3))


def _random_case(seed, shapes=((5, 7), (13,), (4, 4, 3))):
    g = torch.Generator().manual_seed(seed)
    pretrained = {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    task_vectors = {f"task{k}": {n: torch.randn(v.shape, generator=g) * (k + 1) for n, v in pretrained.items()}
                    for k in range(4)}
    # exact cancellations among surviving entries: the majority sign matters there
    a, b = task_vectors["task0"]["p0"], task_vectors["task2"]["p0"]
    a[0, :4] = t(20, -20, 30, -30)
    b[0, :4] = -a[0, :4]
    for name in ("task1", "task3"):
        task_vectors[name]["p0"][0, :4] = 0
    return pretrained, task_vectors


@pytest.mark.parametrize("merge", ties.MERGES)
def test_streamed_merge_equals_the_three_steps(merge):
    pretrained, task_vectors = _random_case(1)
    before = {k: {n: v.clone() for n, v in tv.items()} for k, tv in task_vectors.items()}
    trimmed = [ties.trim(tv, 0.3) for tv in task_vectors.values()]
    signs = ties.elect(trimmed)
    expected = ties.disjoint_merge(trimmed, signs, merge)
    for chunk_size, workers in ((1 << 16, 1), (3, 2), (1, 1)):
        merged = ties.ties_merge(pretrained, task_vectors, k=0.3, merge=merge, lam=0.7,
                                 chunk_size=chunk_size, workers=workers)
        for n, p in pretrained.items():
            assert torch.equal(merged[n], p + 0.7 * expected[n]), (n, chunk_size)
    assert all(torch.equal(task_vectors[k][n], before[k][n]) for k in before for n in before[k])


def test_cancelled_coordinates_follow_the_majority_sign_when_streamed():
    pretrained, task_vectors = _random_case(2)
    merged = ties.ties_merge(pretrained, task_vectors, k=0.3, lam=1.0, chunk_size=2)
    trimmed = [ties.trim(tv, 0.3) for tv in task_vectors.values()]
    majority = torch.sign(sum(torch.sign(sum(tr[n] for tr in trimmed)).sum() for n in pretrained))
    assert majority != 0
    # each cancelled coordinate keeps the one entry whose sign is the majority's
    expected = pretrained["p0"][0, :4] + majority * t(20, 20, 30, 30)
    assert torch.equal(merged["p0"][0, :4], expected)


def test_dtype_of_pretrained_is_kept():
    pretrained = {"w": t(1, 2, 3).half()}
    merged = ties.ties_merge(pretrained, {"A": {"w": t(1, 1, -1).half()}}, k=1.0, lam=1.0)
    assert merged["w"].dtype == torch.float16 and torch.equal(merged["w"], t(2, 3, 2).half())


def test_sign_resolved_vectors_sum_to_the_sum_merge():
    pretrained, task_vectors = _random_case(3)
    resolved = ties.sign_resolved(list(task_vectors.values()), k=0.3)
    merged = ties.ties_merge(pretrained, task_vectors, k=0.3, merge="sum", lam=1.0)
    for n, p in pretrained.items():
        assert torch.allclose(p + sum(r[n] for r in resolved), merged[n], rtol=0, atol=1e-5)


# --- the plugin ------------------------------------------------------------------

def test_plugin_registers_through_the_hook():
    registered = []
    ties.mmbench_register_mergers(registered.append)
    (plugin,) = registered
    assert plugin.name == "ties" and plugin.kind == "merger"
    assert plugin.defaults == {"k": 0.2, "merge": "sum", "lambda": 0.3}


def test_plugin_merge_uses_its_parameters():
    pretrained, task_vectors = _random_case(4)
    result = ties.Ties().merge(pretrained, task_vectors, None, {"k": 0.5, "merge": "max", "lambda": 1.5})
    assert isinstance(result, Merged)
    expected = ties.ties_merge(pretrained, task_vectors, k=0.5, merge="max", lam=1.5)
    assert all(torch.equal(result.weights[n], expected[n]) for n in pretrained)
    assert result.info == {"k": 0.5, "merge": "max", "lambda": 1.5}
    defaults = ties.Ties().merge(pretrained, task_vectors, None, {})
    assert all(torch.equal(defaults.weights[n], ties.ties_merge(pretrained, task_vectors)[n]) for n in pretrained)


@pytest.mark.parametrize("params", [{"merge": "median"}, {"k": 0}, {"k": -0.1}])
def test_plugin_rejects_bad_parameters(params):
    pretrained, task_vectors = _random_case(5)
    with pytest.raises(PluginError):
        ties.Ties().merge(pretrained, task_vectors, None, params)


def test_hook_matches_the_hookspec(registrations):
    registered = registrations(ties, "mmbench_register_mergers")
    assert [type(p) for p in registered] == [ties.Ties]


# --- the one-pass threshold: sample bracket, count above, kthvalue inside ---------------------

def _reference_kth(tensors, k):
    return float(torch.cat([x.reshape(-1).float().abs() for x in tensors]).sort(descending=True).values[k - 1])


@pytest.mark.parametrize("step", (1, 3, 211))
def test_kth_largest_magnitude_bracketed_pass_is_exact(step):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(3000, generator=g) * 1e-3, torch.randn(37, 11, generator=g),
               torch.tensor([0.0, -0.0, 1e-42, -1e-42, 5.0, -5.0, 5.0] * 50),  # zeros, denormals, ties
               torch.randn(500, generator=g).half(), torch.randn(400, generator=g).round()]  # many ties
    n = sum(t.numel() for t in tensors)
    for k in (1, 2, 3, 4, 17, 500, 1000, n // 5, n // 2, n - 3, n):
        got = ties.kth_largest_magnitude(tensors, k, step=step, direct_below=0)
        assert got == _reference_kth(tensors, k), (k, step)
        assert got == torch.kthvalue(torch.cat([x.reshape(-1).float().abs() for x in tensors]),
                                     n - k + 1).values.item()


def test_kth_largest_magnitude_all_zero_and_constant():
    for value in (0.0, -2.5):
        tensors = [torch.full((700,), value), torch.full((3, 5), value)]
        for k in (1, 300, 715):
            assert ties.kth_largest_magnitude(tensors, k, direct_below=0) == abs(value)
            assert ties.kth_largest_magnitude(tensors, k) == abs(value)


def test_kth_largest_magnitude_falls_back_when_the_bracket_misses(monkeypatch):
    import mmbench.vectors as vectors
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(5000, generator=g), torch.randn(20, 30, generator=g)]
    for bracket in ((3.0, 4.0), (0.0, 1e-6), (10.0, 20.0)):  # wrong brackets: too high, too low
        monkeypatch.setattr(vectors, "_bracket", lambda *a, b=bracket: b)
        for k in (1, 100, 2500, 5600):
            assert ties.kth_largest_magnitude(tensors, k, direct_below=0) == _reference_kth(tensors, k)


# --- the compiled kernel (plugins/mergers/ties_kernel.py): the same results as the eager path ---

from mmbench_plugins.mergers import ties_kernel  # noqa: E402

def _compiler() -> str | None:
    """The C compiler the kernel would use ($CC, cc, gcc, clang: the first found), or None."""
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def _compiler_found() -> bool:
    return _compiler() is not None


# skipped only where no C compiler is found (or the user turned the kernel off): a kernel that fails
# to compile fails the test below
needs_kernel = pytest.mark.skipif(not _compiler_found() or os.environ.get("MMBENCH_TIES_KERNEL") == "0",
                                  reason="no C compiler, or MMBENCH_TIES_KERNEL=0: TIES runs its eager path")


@needs_kernel
def test_kernel_compiles_and_loads_where_a_compiler_is_found():
    assert ties_kernel.load() is not None, ties_kernel.why_not()


def _float32_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3000, generator=g) * 1e-3, torch.randn(37, 11, generator=g),
            torch.tensor([0.0, -0.0, 1e-42, -1e-42, 5.0, -5.0, 5.0] * 50),  # zeros, denormals, ties
            torch.randn(500, generator=g).half().float(), torch.randn(400, generator=g).round()]  # many ties


@needs_kernel
@pytest.mark.parametrize("step", (1, 3, 211))
def test_kernel_kth_largest_magnitude_is_exact(step):
    tensors = _float32_tensors(3)
    n = sum(t.numel() for t in tensors)
    lib = ties_kernel.load()
    for k in (1, 2, 3, 4, 17, 500, 1000, n // 5, n // 2, n - 3, n):
        got = ties_kernel.kth_largest_magnitude(lib, tensors, k, step=step, direct_below=0)
        assert got == _reference_kth(tensors, k), (k, step)


@needs_kernel
def test_kernel_kth_largest_magnitude_falls_back_on_a_missed_bracket_or_a_full_buffer(monkeypatch):
    import mmbench.vectors as vectors
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(5000, generator=g), torch.randn(20, 30, generator=g)]
    lib = ties_kernel.load()
    for k in (1, 100, 2500, 5600):  # 10 entries of room: the bracket holds more
        assert ties_kernel.kth_largest_magnitude(lib, tensors, k, direct_below=0, step=1, cap=10) \
            == _reference_kth(tensors, k)
    for bracket in ((3.0, 4.0), (0.0, 1e-6), (10.0, 20.0)):  # wrong brackets: too high, too low
        monkeypatch.setattr(vectors, "_bracket", lambda *a, b=bracket: b)
        for k in (1, 100, 2500, 5600):
            assert ties_kernel.kth_largest_magnitude(lib, tensors, k, direct_below=0) == _reference_kth(tensors, k)


def _kernel_case(seed, majority, tasks=5):
    """Tensors over several of the kernel's blocks of coordinates, with exact cancellations, zero
    θ_pre entries and a chosen majority sign (the sign of most surviving entries)."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((300, 7), (1000,), (13,), (4, 4, 3))
    pretrained = {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    pretrained["p1"][::7] = 0.0
    task_vectors = {f"task{k}": {n: torch.randn(v.shape, generator=g).abs() * majority * (k % 5 + 1)
                                 + 0.5 * torch.randn(v.shape, generator=g) for n, v in pretrained.items()}
                    for k in range(tasks)}
    if tasks >= 3:
        a, b = task_vectors["task0"]["p1"], task_vectors["task2"]["p1"]
        a[:60] = torch.randn(60, generator=g) * 40  # survive every trim, then cancel exactly
        b[:60] = -a[:60]
        for name in task_vectors:
            if name not in ("task0", "task2"):
                task_vectors[name]["p1"][:60] = 0
    return pretrained, task_vectors


@needs_kernel
@pytest.mark.parametrize("merge", ties.MERGES)
@pytest.mark.parametrize("majority", (1.0, -1.0))
@pytest.mark.parametrize("tasks", (1, 2, 5, 8, 12, 13, 17))  # 2-12: the blocks specialised to K; 1, 13, 17: the general block
def test_kernel_merge_is_bit_identical_to_the_eager_merge(merge, majority, tasks):
    pretrained, task_vectors = _kernel_case(5, majority, tasks)
    before = {k: {n: v.clone() for n, v in tv.items()} for k, tv in task_vectors.items()}
    for k, lam in ((0.2, 0.3), (0.5, 0.7), (1.0, 1.0)):
        eager = ties.ties_merge(pretrained, task_vectors, k=k, merge=merge, lam=lam, kernel=False)
        compiled = ties.ties_merge(pretrained, task_vectors, k=k, merge=merge, lam=lam, kernel=True, workers=2)
        for n in pretrained:
            assert torch.equal(compiled[n], eager[n]), (n, k, lam)
    trimmed = [ties.trim(tv, 0.5) for tv in task_vectors.values()]
    expected = ties.disjoint_merge(trimmed, ties.elect(trimmed), merge)
    compiled = ties.ties_merge(pretrained, task_vectors, k=0.5, merge=merge, lam=0.7, kernel=True)
    assert all(torch.equal(compiled[n], pretrained[n] + 0.7 * expected[n]) for n in pretrained)
    assert all(torch.equal(task_vectors[k][n], before[k][n]) for k in before for n in before[k])


def test_without_the_kernel_ties_runs_eagerly(monkeypatch):
    pretrained, task_vectors = _kernel_case(6, 1.0)
    expected = ties.ties_merge(pretrained, task_vectors, kernel=False)
    monkeypatch.setattr(ties_kernel, "_loaded", {})
    monkeypatch.setattr(ties_kernel, "_why", [])
    monkeypatch.setenv("MMBENCH_TIES_KERNEL", "0")
    merged = ties.ties_merge(pretrained, task_vectors)
    assert all(torch.equal(merged[n], expected[n]) for n in pretrained)
    assert ties_kernel.why_not() == "MMBENCH_TIES_KERNEL=0"
    with pytest.raises(RuntimeError, match="MMBENCH_TIES_KERNEL=0"):
        ties.ties_merge(pretrained, task_vectors, kernel=True)


def test_without_a_compiler_ties_runs_eagerly(monkeypatch, tmp_path):
    pretrained, task_vectors = _kernel_case(7, 1.0)
    expected = ties.ties_merge(pretrained, task_vectors, kernel=False)
    monkeypatch.setattr(ties_kernel, "_loaded", {})
    monkeypatch.setattr(ties_kernel, "_why", [])
    monkeypatch.setattr(ties_kernel.shutil, "which", lambda name: None)
    monkeypatch.delenv("MMBENCH_TIES_KERNEL", raising=False)
    monkeypatch.setenv("MMBENCH_KERNEL_CACHE", str(tmp_path))
    merged = ties.ties_merge(pretrained, task_vectors)
    assert all(torch.equal(merged[n], expected[n]) for n in pretrained)
    assert "no C compiler" in ties_kernel.why_not() and not list(tmp_path.iterdir())


@needs_kernel
def test_kernel_is_used_for_float32_only():
    pretrained, task_vectors = _kernel_case(8, 1.0)
    half = {n: p.half() for n, p in pretrained.items()}
    merged = ties.ties_merge(half, task_vectors)  # θ_pre in float16: the eager path
    assert all(m.dtype == torch.float16 for m in merged.values())
    with pytest.raises(RuntimeError, match="float32"):
        ties.ties_merge(half, task_vectors, kernel=True)


@needs_kernel
def test_kernel_radix_selection_by_hand():
    lib = ties_kernel.load()
    values = t(3.0, 1.0, 2.0, 2.0, 0.0, 5.0)
    assert ties_kernel._largest(lib, values, [1, 2, 3, 4, 5, 6]) == [5.0, 3.0, 2.0, 2.0, 1.0, 0.0]
    # neighbours that differ in the last bits only: the second and third passes decide
    a = 1.0
    b, c = float(torch.nextafter(t(a), t(2.0))), float(torch.nextafter(torch.nextafter(t(a), t(2.0)), t(2.0)))
    close = t(b, a, c, b, 1e-42, 0.5)  # 1e-42: a denormal, below every normal
    assert ties_kernel._largest(lib, close, [1, 2, 3, 4, 5, 6]) == [c, b, b, a, 0.5, float(t(1e-42))]
    g = torch.Generator().manual_seed(7)
    many = torch.randn(5000, generator=g).abs().round(decimals=2)  # many ties
    ordered = many.sort(descending=True).values
    ranks = [1, 2, 17, 2500, 4999, 5000]
    assert ties_kernel._largest(lib, many, ranks) == [float(ordered[r - 1]) for r in ranks]


def _bracket_by_hand(x, lo, hi):
    a = x.abs()
    return int((a > hi).sum()), a[(a >= lo) & (a <= hi)].tolist()


@needs_kernel
@pytest.mark.parametrize("n", (5, 64, 1000, 4096 + 37))  # the 64-wide steps and the tail
def test_kernel_bracket_pass_counts_above_and_copies_inside_in_order(n):
    lib = ties_kernel.load()
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    lo, hi = 0.5, 1.5
    above, inside = _bracket_by_hand(x, lo, hi)
    for cap in (n, 3):  # room for all, and a buffer that fills: every entry still counted
        buf = torch.full((cap,), -1.0)
        count = torch.zeros(1, dtype=torch.int64)
        assert lib.mm_ties_bracket(x.data_ptr(), n, lo, hi, buf.data_ptr(), cap, count.data_ptr()) == above
        assert int(count) == len(inside)
        assert buf[:min(cap, len(inside))].tolist() == inside[:cap]


@needs_kernel
def test_portable_kernel_build_gives_the_same_results(tmp_path):
    """The C paths used where the CPU has no AVX-512 (built without -march=native)."""
    import ctypes
    target = tmp_path / "portable.so"
    ties_kernel._compile(_compiler(), target, native=False)
    portable = ctypes.CDLL(str(target))
    ties_kernel._declare(portable)
    tensors = _float32_tensors(5)
    n = sum(t.numel() for t in tensors)
    for k in (1, 17, n // 5, n):
        got = ties_kernel.kth_largest_magnitude(portable, tensors, k, step=3, direct_below=0)
        assert got == _reference_kth(tensors, k), k
    x = torch.randn(4096 + 37, generator=torch.Generator().manual_seed(1))
    above, inside = _bracket_by_hand(x, 0.5, 1.5)
    buf, count = torch.empty(x.numel()), torch.zeros(1, dtype=torch.int64)
    assert portable.mm_ties_bracket(x.data_ptr(), x.numel(), 0.5, 1.5, buf.data_ptr(), x.numel(),
                                    count.data_ptr()) == above
    assert buf[:int(count)].tolist() == inside

"""TIES's two streaming passes as a small C kernel, compiled on first use.

:func:`mmbench_plugins.mergers.ties.ties_merge` reads every task vector twice: once for its
trim threshold, once to elect signs and merge. In eager PyTorch each pass is a chain of
element-wise ops (abs, compares, a masked select; hardshrink, add, sign, multiply,
threshold, add), each a full trip through memory: 21× the copy bound at 8 × ViT-B-32
(docs/performance.md). Here each pass is one loop that reads each entry once:

* :func:`kth_largest_magnitude`: the exact k-th largest |x| over a task's tensors. A sample
  of one entry in 211, taken in runs of 16 consecutive entries (whole cache lines), brackets
  it in [lo, hi] (the margin rule of :func:`mmbench.vectors._bracket`); one
  pass counts the entries above hi and copies the few inside the bracket (about 0.5 % at
  ViT-B-32 scale; 64 entries a step with AVX-512 compares and compresses where the CPU has
  them, a portable loop elsewhere: about 14 ms a ViT-B-32 task vector, where reading it takes
  12), where a selection picks the value. Both selections (the sample's two ranks, the value
  inside the bracket) are radix selections on the float bits (12, 10 and 10 bits: three passes
  over the few entries; the two ranks of a ViT-B-32 task's sample of 417,680 in about 1.3 ms,
  where ``numpy.partition`` took 3-5 ms). A missed bracket, or more entries inside than the
  buffer holds, falls back to :func:`mmbench.vectors.kth_largest_magnitude`. Any bracket gives
  the same exact value.
* :func:`merge_tensor`: elect (s = sign(Σ_k T̂_k)) and disjoint merge (sum, mean or max of
  the agreeing entries), θ_pre + λ·merged, over blocks of 64 coordinates; every loop runs
  over the block's coordinates, so each is vectorised. For 2 to 12 tasks a block specialised
  to K keeps each coordinate's K trimmed entries in registers (about 30 % faster than the
  general block, which keeps the K trimmed rows in L1).

Results are bit-identical to the eager path for finite inputs: the same float32 operations in
the same order (each coordinate's K-term sum is added task by task; λ is rounded to float32
as PyTorch rounds a Python scalar; compiled with ``-ffp-contract=off`` so no multiply-add is
fused). tests/test_ties.py compares the two paths bit for bit (1, 2, 5, 8, 12 and 17 tasks,
the three merges, exact cancellations, either majority sign, zero θ_pre entries). Coordinates
whose elected sign is 0 are reported, as in the eager path, for the majority sign to redo. NaN
entries are not handled alike (the eager trim keeps a NaN, this one drops it); a task vector
holding NaN is broken upstream either way.

The source below is compiled with the system C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``) and ``-O3 -march=native`` (without it where the compiler refuses it) into a
per-user cache (``$MMBENCH_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/mmbench/kernels`` or
``~/.cache/mmbench/kernels``), named by a hash of the source, the flags and this CPU's model
and feature flags, so a cache shared between machines never loads code built for another
CPU. Compiling takes about a second, once per machine. Where no
compiler is found, or compiling fails, or ``MMBENCH_TIES_KERNEL=0``, :func:`load` returns
None and TIES runs its eager path (same results, slower).
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from mmbench.lazy import torch

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define SCAN 1024   /* entries per step of the threshold pass */
#define BLOCK 64    /* coordinates per step of the merge */
#define RUN 16      /* consecutive entries per run of the bracket's sample */

/* |x| of one entry in step of each piece, in runs of RUN consecutive entries (one 64-byte
   cache line, where every step-th entry alone would touch a line every few), into out;
   returns how many */
int64_t mm_ties_sample(int pieces, const float* const* x, const int64_t* n, int64_t step, float* out) {
  int64_t m = 0;
  for (int p = 0; p < pieces; p++)
    for (int64_t i = 0; i < n[p]; i += RUN * step)
      for (int64_t j = i; j < i + RUN && j < n[p]; j++) out[m++] = fabsf(x[p][j]);
  return m;
}

/* one pass over n entries: the number with |x| > hi is returned; those with lo <= |x| <= hi
   are copied to buf[*inside...] in order (while it has room; *inside counts them all) */
int64_t mm_ties_bracket(const float* x, int64_t n, float lo, float hi,
                        float* buf, int64_t cap, int64_t* inside) {
  int64_t above = 0, m = *inside, i = 0;
#if defined(__AVX512F__)
  /* 64 entries a step: the count above hi in 16 int32 lanes (from the compare's mask), the
     entries inside (not above hi, not below lo) packed by a compress into a register and stored
     16 wide (the slack past them is overwritten by the next) */
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  const __m512i one = _mm512_set1_epi32(1);
  while (i + 64 <= n) {
    int64_t end = n - i > ((int64_t)64 << 20) ? i + ((int64_t)64 << 20) : n;  /* lanes < 2^22 */
    __m512i count = _mm512_setzero_si512();
    for (; i + 64 <= end; i += 64) {
      __m512 a[4];
      __mmask16 in[4];
      for (int q = 0; q < 4; q++) {
        a[q] = _mm512_abs_ps(_mm512_loadu_ps(x + i + 16 * q));
        __mmask16 gt = _mm512_cmp_ps_mask(a[q], vhi, _CMP_GT_OQ);
        count = _mm512_mask_add_epi32(count, gt, count, one);
        in[q] = _mm512_mask_cmp_ps_mask(_knot_mask16(gt), a[q], vlo, _CMP_GE_OQ);
      }
      if (m + 64 <= cap)  /* no branch on the data: about 1 step in 4 has an entry inside */
        for (int q = 0; q < 4; q++) {
          _mm512_storeu_ps(buf + m, _mm512_maskz_compress_ps(in[q], a[q]));
          m += __builtin_popcount(in[q]);
        }
      else
        for (int q = 0; q < 4; q++)
          if (in[q]) {
            int c = __builtin_popcount(in[q]);
            __m512 packed = _mm512_maskz_compress_ps(in[q], a[q]);
            if (m + 16 <= cap) _mm512_storeu_ps(buf + m, packed);
            else {
              float t[16];
              _mm512_storeu_ps(t, packed);
              for (int z = 0; z < c; z++) if (m + z < cap) buf[m + z] = t[z];
            }
            m += c;
          }
    }
    above += _mm512_reduce_add_epi32(count);
  }
#endif
  uint8_t flag[SCAN];
  for (int64_t start = i; start < n; start += SCAN) {
    int len = (int)((n - start) < SCAN ? (n - start) : SCAN);
    const float* xb = x + start;
    int count = 0;
    for (int j = 0; j < len; j++) {  /* vectorised: count above, flag inside */
      float a = fabsf(xb[j]);
      count += a > hi;
      flag[j] = (a >= lo) & (a <= hi);
    }
    above += count;
    int j = 0;
    for (; j + 8 <= len; j += 8) {  /* eight flags at a time: most words are 0 */
      uint64_t word;
      __builtin_memcpy(&word, flag + j, 8);
      if (word)
        for (int q = j; q < j + 8; q++)
          if (flag[q]) { if (m < cap) buf[m] = fabsf(xb[q]); m++; }
    }
    for (; j < len; j++)
      if (flag[j]) { if (m < cap) buf[m] = fabsf(xb[j]); m++; }
  }
  *inside = m;
  return above;
}

/* mm_ties_bracket over each of the pieces in turn (one call for a task's tensors) */
int64_t mm_ties_bracket_pieces(int pieces, const float* const* x, const int64_t* n, float lo, float hi,
                               float* buf, int64_t cap, int64_t* inside) {
  int64_t above = 0;
  for (int p = 0; p < pieces; p++) above += mm_ties_bracket(x[p], n[p], lo, hi, buf, cap, inside);
  return above;
}

/* the ranks[j]-th largest (1-based, 1 <= ranks[j] <= n) of n non-negative floats, for j < nr,
   into out[j]: a radix selection on the bit patterns (ordered as the numbers for x >= 0), the
   top 12 bits in one pass shared by the ranks, then 10 and 10 bits among the entries that share
   the bits found so far */
void mm_ties_largest(const float* a, int64_t n, int nr, const int64_t* ranks, float* out) {
  int64_t top[4096] = {0}, hist[1024];
  for (int64_t i = 0; i < n; i++) {
    uint32_t u;
    __builtin_memcpy(&u, a + i, 4);
    top[u >> 20]++;
  }
  for (int j = 0; j < nr; j++) {
    int64_t r = ranks[j];
    int b = 4095;
    while (r > top[b]) r -= top[b--];
    uint32_t prefix = (uint32_t)b << 20, mask = 0xFFFu << 20;
    for (int shift = 10; shift >= 0; shift -= 10) {
      for (int q = 0; q < 1024; q++) hist[q] = 0;
      for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        __builtin_memcpy(&u, a + i, 4);
        if ((u & mask) == prefix) hist[(u >> shift) & 1023]++;
      }
      b = 1023;
      while (r > hist[b]) r -= hist[b--];
      prefix |= (uint32_t)b << shift;
      mask |= 1023u << shift;
    }
    __builtin_memcpy(out + j, &prefix, 4);
  }
}

/* the trim of one entry: kept where |v| >= threshold, i.e. |v| > c (c just below it) */
static inline float trimmed(float v, float c) { return fabsf(v) > c ? v : 0.0f; }

/* Per coordinate, as the eager path: T_k = trim(row_k); sum = T_1 + ... + T_K in task order;
   s = -1 where sum < 0, else +1 (0 sums are reported to the caller); g_k = T_k * s, kept where
   > 0; sum: the g_k added in task order; mean: that sum / max(1, their number); max: the
   largest; merged = that * s; out = w + lam * merged. The K trimmed rows of BLOCK coordinates
   are kept in tr (L1); total and comb keep each coordinate's sum and combined magnitude for
   the caller's check of zero sums. Every loop runs over i, so each vectorises. */
static void merge_block(int K, const float* const* rows, const float* cuts, const float* w,
                        float* out, int64_t start, int m, float lam, int mode,
                        float* total, float* comb, float* tr) {
  float sfill[BLOCK], cnt[BLOCK];
  for (int k = 0; k < K; k++) {
    const float* r = rows[k] + start; float c = cuts[k]; float* t = tr + (int64_t)k * BLOCK;
    for (int i = 0; i < m; i++) t[i] = trimmed(r[i], c);
  }
  for (int i = 0; i < m; i++) total[i] = tr[i];
  for (int k = 1; k < K; k++) {
    const float* t = tr + (int64_t)k * BLOCK;
    for (int i = 0; i < m; i++) total[i] += t[i];
  }
  for (int i = 0; i < m; i++) { sfill[i] = total[i] < 0.0f ? -1.0f : 1.0f; comb[i] = 0.0f; cnt[i] = 0.0f; }
  for (int k = 0; k < K; k++) {
    const float* t = tr + (int64_t)k * BLOCK;
    if (mode == 0) {
      for (int i = 0; i < m; i++) { float g = t[i] * sfill[i]; comb[i] += g > 0.0f ? g : 0.0f; }
    } else if (mode == 1) {
      for (int i = 0; i < m; i++) {
        float g = t[i] * sfill[i]; g = g > 0.0f ? g : 0.0f;
        comb[i] += g; cnt[i] += g > 0.0f ? 1.0f : 0.0f;
      }
    } else {
      for (int i = 0; i < m; i++) {
        float g = t[i] * sfill[i]; g = g > 0.0f ? g : 0.0f;
        comb[i] = comb[i] > g ? comb[i] : g;
      }
    }
  }
  const float* wb = w + start; float* ob = out + start;
  if (mode == 1) {
    for (int i = 0; i < m; i++) ob[i] = wb[i] + lam * ((comb[i] / (cnt[i] > 1.0f ? cnt[i] : 1.0f)) * sfill[i]);
  } else {
    for (int i = 0; i < m; i++) ob[i] = wb[i] + lam * (comb[i] * sfill[i]);
  }
}

/* The same per coordinate for K = 2..12 tasks, with K a constant: the coordinate's K trimmed
   entries stay in registers (no trip through tr); inlined through the switch below, which
   vectorises where a table of function pointers did not (gcc 12). Same operations, same order. */
#define REG(KK, NAME, COMBINE, RESULT)                                                            \
static inline void NAME##_##KK(const float* const* rows, const float* cuts, const float* w,      \
                               float* out, int64_t start, int m, float lam, float* total, float* comb) { \
  const float* r[KK]; float c[KK];                                                                \
  for (int k = 0; k < KK; k++) { r[k] = rows[k] + start; c[k] = cuts[k]; }                       \
  const float* wb = w + start; float* ob = out + start;                                           \
  for (int i = 0; i < m; i++) {                                                                   \
    float t[KK];                                                                                  \
    for (int k = 0; k < KK; k++) t[k] = trimmed(r[k][i], c[k]);                                   \
    float sum = t[0];                                                                             \
    for (int k = 1; k < KK; k++) sum += t[k];                                                     \
    float s = sum < 0.0f ? -1.0f : 1.0f, acc = 0.0f, cnt = 0.0f;                                  \
    for (int k = 0; k < KK; k++) { float g = t[k] * s; g = g > 0.0f ? g : 0.0f; COMBINE; }        \
    total[i] = sum; comb[i] = acc;                                                                \
    ob[i] = wb[i] + lam * (RESULT * s);                                                           \
  }                                                                                               \
}
#define REG3(KK) REG(KK, rsum, acc += g, acc) \
  REG(KK, rmean, (acc += g, cnt += g > 0.0f ? 1.0f : 0.0f), (acc / (cnt > 1.0f ? cnt : 1.0f))) \
  REG(KK, rmax, acc = acc > g ? acc : g, acc)
REG3(2) REG3(3) REG3(4) REG3(5) REG3(6) REG3(7) REG3(8) REG3(9) REG3(10) REG3(11) REG3(12)
#define CASE(KK) case KK: if (mode == 0) rsum_##KK(rows, cuts, w, out, start, m, lam, total, comb); \
  else if (mode == 1) rmean_##KK(rows, cuts, w, out, start, m, lam, total, comb); \
  else rmax_##KK(rows, cuts, w, out, start, m, lam, total, comb); break;

/* elect + disjoint merge of n coordinates of K task rows (mode 0 sum, 1 mean, 2 max);
   tr: room for K * BLOCK floats. Coordinates whose sum is 0 and which have an agreeing entry
   or a zero w are written to suspects (*nsuspects of them): the caller redoes them with the
   majority sign. Returns the sum of the elected signs. */
int64_t mm_ties_merge(int K, const float* const* rows, const float* cuts, const float* w,
                      float* out, int64_t n, float lam, int mode,
                      int64_t* suspects, int64_t* nsuspects, float* tr) {
  int64_t sign_total = 0, ns = 0;
  float total[BLOCK], comb[BLOCK];
  for (int64_t start = 0; start < n; start += BLOCK) {
    int m = (int)((n - start) < BLOCK ? (n - start) : BLOCK);
    switch (K) {
      CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
      default: merge_block(K, rows, cuts, w, out, start, m, lam, mode, total, comb, tr);
    }
    int signs = 0, flagged = 0;
    uint8_t flag[BLOCK];
    for (int i = 0; i < m; i++) {  /* vectorised: signs, and the zero sums to report */
      float t = total[i];
      signs += (t > 0.0f) - (t < 0.0f);
      flag[i] = (t == 0.0f) & ((comb[i] > 0.0f) | (w[start + i] == 0.0f));
      flagged += flag[i];
    }
    sign_total += signs;
    if (flagged)
      for (int i = 0; i < m; i++)
        if (flag[i]) suspects[ns++] = start + i;
  }
  *nsuspects = ns;
  return sign_total;
}
"""

# no fused multiply-add (-ffp-contract=off) and IEEE results; -fno-trapping-math lets the compiler
# turn the selects into vector blends (it changes no value, only whether FP exceptions may trap)
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math")
NATIVE = "-march=native"
MODES = {"sum": 0, "mean": 1, "max": 2}
BLOCK = 64  # the kernel's block of coordinates (its BLOCK): K·BLOCK floats of scratch
RUN = 16  # the kernel's RUN: consecutive entries per run of the bracket's sample

_lock = threading.Lock()
_loaded: dict[str, "ctypes.CDLL | None"] = {}
_why: list[str] = []  # why the kernel is not used, when it is not


def _cpu_id() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(dict.fromkeys(wanted))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path:
    if os.environ.get("MMBENCH_KERNEL_CACHE"):
        return Path(os.environ["MMBENCH_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmbench" / "kernels"


def _compile(compiler: str, target: Path, native: bool = True) -> None:
    """Build the shared library at ``target`` (atomically: a temporary file, then a rename);
    ``native=False`` builds for the compiler's default target (the portable C paths, as on a
    CPU without AVX-512: the tests build both)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "ties_kernel.c"
        source.write_text(SOURCE)
        built = Path(tmp) / target.name
        for flags in ((*FLAGS, NATIVE), FLAGS) if native else (FLAGS,):  # -march=native where known
            done = subprocess.run([compiler, *flags, "-o", str(built), str(source), "-lm"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.copyfile(built, partial)
        os.replace(partial, target)


def load() -> "ctypes.CDLL | None":
    """The compiled kernel, or None (TIES then runs eagerly; :func:`why_not` says why)."""
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        lib = None
        if os.environ.get("MMBENCH_TIES_KERNEL", "1") == "0":
            _why.append("MMBENCH_TIES_KERNEL=0")
        else:
            compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)),
                            None)
            if compiler is None:
                _why.append("no C compiler found ($CC, cc, gcc, clang)")
            else:
                digest = hashlib.sha256("\n".join((SOURCE, compiler, *FLAGS, NATIVE, _cpu_id())).encode())
                target = cache_dir() / f"ties-{digest.hexdigest()[:16]}.so"
                try:
                    if not target.exists():
                        _compile(compiler, target)
                    lib = ctypes.CDLL(str(target))
                    _declare(lib)
                except (OSError, RuntimeError) as err:
                    _why.append(f"compiling the TIES kernel with {compiler} failed: {err}")
                    lib = None
        _loaded["lib"] = lib
        return lib


def why_not() -> str | None:
    """Why :func:`load` returned None (None when the kernel is in use or not tried yet)."""
    return _why[-1] if _why else None


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mm_ties_sample.restype = i64
    lib.mm_ties_sample.argtypes = [ctypes.c_int, p, p, i64, p]
    lib.mm_ties_bracket.restype = i64
    lib.mm_ties_bracket.argtypes = [p, i64, ctypes.c_float, ctypes.c_float, p, i64, p]
    lib.mm_ties_bracket_pieces.restype = i64
    lib.mm_ties_bracket_pieces.argtypes = [ctypes.c_int, p, p, ctypes.c_float, ctypes.c_float, p, i64, p]
    lib.mm_ties_largest.restype = None
    lib.mm_ties_largest.argtypes = [p, i64, ctypes.c_int, p, p]
    lib.mm_ties_merge.restype = i64
    lib.mm_ties_merge.argtypes = [ctypes.c_int, p, p, p, p, i64, ctypes.c_float, ctypes.c_int, p, p, p]


def usable(*tensors: torch.Tensor) -> bool:
    """The kernel reads float32, contiguous CPU memory only."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _pointers(tensors) -> "ctypes.Array":
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _largest(lib: ctypes.CDLL, values: torch.Tensor, ranks: list[int]) -> list[float]:
    """The ``rank``-th largest of ``values`` (non-negative float32, 1-based) for each of
    ``ranks``, by the kernel's radix selection (exact: the value itself, not an estimate)."""
    if not ranks:
        return []
    if not all(1 <= r <= values.numel() for r in ranks):
        raise ValueError(f"ranks must be in [1, {values.numel()}], not {ranks}")
    wanted = (ctypes.c_int64 * len(ranks))(*ranks)
    out = (ctypes.c_float * len(ranks))()
    lib.mm_ties_largest(values.data_ptr(), values.numel(), len(ranks), wanted, out)
    return list(out)


def bracket(lib: ctypes.CDLL, pieces, k: int, total: int, step: int, sigmas: float,
            scratch: torch.Tensor | None = None) -> tuple[float, float]:
    """(lo, hi) that most likely bracket the k-th largest |x|, from a sample of one entry in
    ``step`` (runs of RUN consecutive entries, one run every RUN·``step``): the margin rule of
    :func:`mmbench.vectors._bracket` (repeated here, that module being part of every stage's
    fingerprint), with the sample taken and both ranks selected in one call, without copies.
    ``scratch``: float32 room for the sample where it is large enough (else one is allocated)."""
    run = RUN * step
    size = sum(-(-p.numel() // run) * RUN for p in pieces)
    sample = scratch if scratch is not None and scratch.numel() >= size else torch.empty(size, dtype=torch.float32)
    lengths = (ctypes.c_int64 * len(pieces))(*[p.numel() for p in pieces])
    n = lib.mm_ties_sample(len(pieces), _pointers(pieces), lengths, step, sample.data_ptr())
    rank = k * n / total  # the k-th largest's expected rank (1-based) within the sample
    margin = sigmas * math.sqrt(rank * max(1.0 - rank / n, 0.0)) + 2
    hi_rank, lo_rank = math.floor(rank - margin), math.ceil(rank + margin)  # 1-based, largest first
    ranks = [r for r in (hi_rank, lo_rank) if 1 <= r <= n]
    found = dict(zip(ranks, _largest(lib, sample[:n], ranks)))
    return found.get(lo_rank, 0.0), found.get(hi_rank, math.inf)


def kth_largest_magnitude(lib: ctypes.CDLL, tensors, k: int, *, step: int | None = None,
                          direct_below: int | None = None, cap: int | None = None) -> float:
    """The exact k-th largest |x| over ``tensors`` (float32, contiguous): one pass in C, as
    :func:`mmbench.vectors.kth_largest_magnitude` (to which it falls back) computes it eagerly.
    ``step``, ``direct_below``: as there (its defaults); ``cap``: room for the entries inside
    the bracket (default 1/64 of them all, plus 65,536)."""
    from mmbench.vectors import BRACKET_SIGMAS, DIRECT_BELOW, SAMPLE_STEP
    from mmbench.vectors import kth_largest_magnitude as eager

    step = SAMPLE_STEP if step is None else step
    direct_below = DIRECT_BELOW if direct_below is None else direct_below
    pieces = [t.reshape(-1) for t in tensors if t.numel()]
    total = sum(p.numel() for p in pieces)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], not {k}")
    if total < direct_below:
        return eager(pieces, k)
    if cap is None:  # the bracket holds about 0.5 % at ViT-B-32 scale; pages are touched as filled
        cap = total // 64 + (1 << 16)
    # one buffer for the sample, then for the entries inside the bracket: its pages fault once
    buffer = torch.empty(max(cap, -(-total // step) + RUN * len(pieces)), dtype=torch.float32)
    lo, hi = bracket(lib, pieces, k, total, step, BRACKET_SIGMAS, scratch=buffer)
    inside = torch.zeros(1, dtype=torch.int64)
    lengths = (ctypes.c_int64 * len(pieces))(*[p.numel() for p in pieces])
    above = lib.mm_ties_bracket_pieces(len(pieces), _pointers(pieces), lengths, lo, hi, buffer.data_ptr(), cap,
                                       inside.data_ptr())
    count = int(inside)
    within = k - above  # the k-th largest is the within-th largest inside the bracket
    if count > cap or not 1 <= within <= count:
        return eager(pieces, k)
    return _largest(lib, buffer[:count], [within])[0]


def merge_tensor(lib: ctypes.CDLL, weight: torch.Tensor, rows, cuts, lam: float, merge: str
                 ) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
    """Elect and disjoint-merge one tensor in C: (θ_pre + λ·merged flattened, Σ s, the coordinates
    the majority sign could still change), as ``ties_merge``'s eager ``merge_tensor`` returns."""
    w = weight.reshape(-1)
    n = w.numel()
    out = torch.empty(n, dtype=torch.float32)
    flat = [r.reshape(-1) for r in rows]
    cut_array = (ctypes.c_float * len(cuts))(*cuts)
    suspects = torch.empty(n, dtype=torch.int64)  # pages touched only where written
    found = torch.zeros(1, dtype=torch.int64)
    scratch = torch.empty(len(flat) * BLOCK, dtype=torch.float32)
    sign_total = lib.mm_ties_merge(len(flat), _pointers(flat), cut_array, w.data_ptr(), out.data_ptr(), n,
                                   lam, MODES[merge], suspects.data_ptr(), found.data_ptr(), scratch.data_ptr())
    count = int(found)
    pending = [suspects[:count].clone()] if count else []
    return out, float(sign_total), pending

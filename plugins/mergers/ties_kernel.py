"""TIES's two streaming passes as a small C kernel, compiled on first use.

:func:`mmbench_plugins.mergers.ties.ties_merge` reads every task vector twice: once for its
trim threshold, once to elect signs and merge. In eager PyTorch each pass is a chain of
element-wise ops (abs, compares, a masked select; hardshrink, add, sign, multiply,
threshold, add), each a full trip through memory: 21× the copy bound at 8 × ViT-B-32
(docs/performance.md). Here each pass is one loop that reads each entry once:

* :func:`kth_largest_magnitude`: the exact k-th largest |x| over a task's tensors. A strided
  sample brackets it in [lo, hi] (:func:`mmbench.vectors._bracket`, as the eager path); one
  pass counts the entries above hi and copies the few inside the bracket (about 0.5 % at
  ViT-B-32 scale), where ``kthvalue`` picks the value. A missed bracket, or more entries
  inside than the buffer holds, falls back to :func:`mmbench.vectors.kth_largest_magnitude`.
* :func:`merge_tensor`: elect (s = sign(Σ_k T̂_k)) and disjoint merge (sum, mean or max of
  the agreeing entries), θ_pre + λ·merged, over blocks of 256 coordinates whose K trimmed
  rows stay in L1.

Results are bit-identical to the eager path for finite inputs: the same float32 operations in
the same order (each coordinate's K-term sum is added task by task; λ is rounded to float32
as PyTorch rounds a Python scalar; compiled with ``-ffp-contract=off`` so no multiply-add is
fused). Coordinates whose elected sign is 0 are reported, as in the eager path, for the
majority sign to redo. NaN entries are not handled alike (the eager trim keeps a NaN, this one
drops it); a task vector holding NaN is broken upstream either way.

The source below is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``) and
``-O3 -march=native`` into a per-user cache (``$MMBENCH_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/mmbench/kernels`` or ``~/.cache/mmbench/kernels``), named by a hash of the
source, the flags and this CPU's model and feature flags, so a cache shared between machines
never loads code built for another CPU. Compiling takes about a second, once. Where no
compiler is found, or compiling fails, or ``MMBENCH_TIES_KERNEL=0``, :func:`load` returns
None and TIES runs its eager path (same results, slower).
"""
from __future__ import annotations

import ctypes
import hashlib
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

#define BLOCK 256
#define SCAN 1024

/* one pass over n entries: the number with |x| > hi is returned; those with lo <= |x| <= hi
   are copied to buf[*inside...] (while it has room; *inside counts them all) */
int64_t mm_ties_bracket(const float* x, int64_t n, float lo, float hi,
                        float* buf, int64_t cap, int64_t* inside) {
  int64_t above = 0, m = *inside;
  uint8_t flag[SCAN];
  for (int64_t start = 0; start < n; start += SCAN) {
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

/* hardshrink(v, c): the trim of one entry (|v| >= threshold <=> |v| > c) */
static inline float trimmed(float v, float c) { return (v >= -c && v <= c) ? 0.0f : v; }

/* elect + disjoint merge of n coordinates of K task rows, out = w + lam * merged.
   mode 0 sum, 1 mean, 2 max. Where the sum of the trimmed entries is 0 the sign is +1
   provisionally; such coordinates with an agreeing entry or a zero w are written to
   suspects (offsets; *nsuspects of them). Returns the sum of the elected signs. */
int64_t mm_ties_merge(int K, const float* const* rows, const float* cuts, const float* w,
                      float* out, int64_t n, float lam, int mode,
                      int64_t* suspects, int64_t* nsuspects) {
  int64_t sign_total = 0, ns = 0;
  float total[BLOCK], sfill[BLOCK], comb[BLOCK], cnt[BLOCK];
  for (int64_t start = 0; start < n; start += BLOCK) {
    int m = (int)((n - start) < BLOCK ? (n - start) : BLOCK);
    {
      const float* r = rows[0] + start; float c = cuts[0];
      for (int i = 0; i < m; i++) total[i] = trimmed(r[i], c);
    }
    for (int k = 1; k < K; k++) {  /* the sum, task by task, as total.add_(t) */
      const float* r = rows[k] + start; float c = cuts[k];
      for (int i = 0; i < m; i++) total[i] += trimmed(r[i], c);
    }
    int signs = 0, zeros = 0;
    for (int i = 0; i < m; i++) {
      float t = total[i];
      int pos = t > 0.0f, neg = t < 0.0f;
      signs += pos - neg;
      zeros += !(pos | neg);
      sfill[i] = neg ? -1.0f : 1.0f;
      comb[i] = 0.0f;
      cnt[i] = 0.0f;
    }
    sign_total += signs;
    for (int k = 0; k < K; k++) {  /* |T_k| where it agrees with the sign: threshold(t * s, 0, 0) */
      const float* r = rows[k] + start; float c = cuts[k];
      if (mode == 0) {
        for (int i = 0; i < m; i++) {
          float g = trimmed(r[i], c) * sfill[i];
          comb[i] += g > 0.0f ? g : 0.0f;
        }
      } else if (mode == 1) {
        for (int i = 0; i < m; i++) {
          float g = trimmed(r[i], c) * sfill[i];
          g = g > 0.0f ? g : 0.0f;
          comb[i] += g;
          cnt[i] += g > 0.0f ? 1.0f : 0.0f;
        }
      } else {
        for (int i = 0; i < m; i++) {
          float g = trimmed(r[i], c) * sfill[i];
          g = g > 0.0f ? g : 0.0f;
          comb[i] = comb[i] > g ? comb[i] : g;
        }
      }
    }
    const float* wb = w + start;
    float* ob = out + start;
    if (zeros)
      for (int i = 0; i < m; i++)
        if (total[i] == 0.0f && (comb[i] > 0.0f || wb[i] == 0.0f)) suspects[ns++] = start + i;
    if (mode == 1) {
      for (int i = 0; i < m; i++) {
        float q = cnt[i] > 1.0f ? cnt[i] : 1.0f;
        ob[i] = wb[i] + lam * ((comb[i] / q) * sfill[i]);
      }
    } else {
      for (int i = 0; i < m; i++) ob[i] = wb[i] + lam * (comb[i] * sfill[i]);
    }
  }
  *nsuspects = ns;
  return sign_total;
}
"""

FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")
NATIVE = "-march=native"
MODES = {"sum": 0, "mean": 1, "max": 2}

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


def _compile(compiler: str, target: Path) -> None:
    """Build the shared library at ``target`` (atomically: a temporary file, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "ties_kernel.c"
        source.write_text(SOURCE)
        built = Path(tmp) / target.name
        for flags in ((*FLAGS, NATIVE), FLAGS):  # -march=native where the compiler knows it
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
    lib.mm_ties_bracket.restype = i64
    lib.mm_ties_bracket.argtypes = [p, i64, ctypes.c_float, ctypes.c_float, p, i64, p]
    lib.mm_ties_merge.restype = i64
    lib.mm_ties_merge.argtypes = [ctypes.c_int, p, p, p, p, i64, ctypes.c_float, ctypes.c_int, p, p]


def usable(*tensors: torch.Tensor) -> bool:
    """The kernel reads float32, contiguous CPU memory only."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def kth_largest_magnitude(lib: ctypes.CDLL, tensors, k: int, *, step: int | None = None,
                          direct_below: int | None = None, cap: int | None = None) -> float:
    """The exact k-th largest |x| over ``tensors`` (float32, contiguous): one pass in C, as
    :func:`mmbench.vectors.kth_largest_magnitude` (to which it falls back) computes it eagerly.
    ``step``, ``direct_below``: as there (its defaults); ``cap``: room for the entries inside
    the bracket (default 1/16 of them all, plus 65,536)."""
    from mmbench.vectors import BRACKET_SIGMAS, DIRECT_BELOW, SAMPLE_STEP, _bracket
    from mmbench.vectors import kth_largest_magnitude as eager

    step = SAMPLE_STEP if step is None else step
    direct_below = DIRECT_BELOW if direct_below is None else direct_below

    pieces = [t.reshape(-1) for t in tensors]
    total = sum(p.numel() for p in pieces)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], not {k}")
    if total < direct_below:
        return eager(pieces, k)
    lo, hi = _bracket(pieces, k, total, step, BRACKET_SIGMAS)
    if cap is None:  # the bracket holds about 0.5 % at ViT-B-32 scale; pages are touched as filled
        cap = total // 16 + (1 << 16)
    buffer = torch.empty(cap, dtype=torch.float32)
    inside = torch.zeros(1, dtype=torch.int64)
    above = 0
    for p in pieces:
        above += lib.mm_ties_bracket(p.data_ptr(), p.numel(), lo, hi, buffer.data_ptr(), cap, inside.data_ptr())
    count = int(inside)
    within = k - above  # the k-th largest is the within-th largest inside the bracket
    if count > cap or not 1 <= within <= count:
        return eager(pieces, k)
    values = buffer[:count]
    return float(values.kthvalue(count - within + 1).values)


def merge_tensor(lib: ctypes.CDLL, weight: torch.Tensor, rows, cuts, lam: float, merge: str
                 ) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
    """Elect and disjoint-merge one tensor in C: (θ_pre + λ·merged flattened, Σ s, the coordinates
    the majority sign could still change), as ``ties_merge``'s eager ``merge_tensor`` returns."""
    w = weight.reshape(-1)
    n = w.numel()
    out = torch.empty(n, dtype=torch.float32)
    flat = [r.reshape(-1) for r in rows]
    pointers = (ctypes.c_void_p * len(flat))(*[r.data_ptr() for r in flat])
    cut_array = (ctypes.c_float * len(cuts))(*cuts)
    suspects = torch.empty(n, dtype=torch.int64)  # pages touched only where written
    found = torch.zeros(1, dtype=torch.int64)
    sign_total = lib.mm_ties_merge(len(flat), pointers, cut_array, w.data_ptr(), out.data_ptr(), n,
                                   lam, MODES[merge], suspects.data_ptr(), found.data_ptr())
    count = int(found)
    pending = [suspects[:count].clone()] if count else []
    return out, float(sign_total), pending

"""RegMean (Jin, Ren, Preotiuc-Pietro, Cheng, ICLR 2023, "Dataless Knowledge Fusion by
Merging Weights of Language Models", arXiv 2212.09849), as FusionBench applies it to CLIP
(``method/regmean``, config ``clip_regmean.yaml``); the BadMerging paper evaluates it.

Per linear layer y = W x, the merged W* reproduces every task model's outputs on that
task's own inputs in the least-squares sense, in closed form:

1. Gram matrix per task and layer: run θ_k = θ_pre + τ_k on ``n_images`` (256) shuffled
   unlabelled images of task k's ``split`` (the contributor's own training data), hook the
   layer's input and keep the mean over all tokens of x xᵀ (in × in).
2. Shrink the off-diagonal: G̃_k = α G_k + (1 − α) Diag(G_k), ``alpha`` 0.95 (CLIP's
   config; language models use 0.1). α = 1 is exact RegMean.
3. W* = W_pre + [(Σ_k G̃_k)⁻¹ Σ_k G̃_k ΔW_kᵀ]ᵀ, solved (``torch.linalg.solve``) in
   float64. No λ.
4. Every other tensor, including these layers' biases, LayerNorms, embeddings and the
   patch convolution, is the plain average θ_pre + mean_k τ_k.

Layers of an open_clip ViT (RECONSTRUCTED: FusionBench hooks ``nn.Linear`` modules of HF
CLIP; in open_clip the attention is ``nn.MultiheadAttention``, whose ``in_proj_weight`` is a
bare parameter and whose ``out_proj`` is never called as a module):

- ``attn.in_proj_weight``: the Gram of the ``ln_1`` output (equivalent to HF's separate
  q/k/v projections, which share that input);
- ``attn.out_proj.weight``: the Gram of the attention's output before the projection,
  recomputed from the ``ln_1`` output with the block's in-projection (scaled dot-product
  attention per head, no mask: the image tower has none);
- ``mlp.c_fc.weight`` / ``mlp.c_proj.weight``: their inputs (``nn.Linear`` pre-hooks);
- ``proj`` (applied as x @ proj, in × out, no transpose): the Gram of the class token after
  ``ln_post``, where the tower pools that token after ``ln_post`` (OpenAI CLIP's ViTs);
  otherwise proj is averaged.

A layer without a Gram is averaged, and ``Merged.info`` lists it. Grams are a cached
stage per contributed vector (``regmean.gram``, keyed by the vector's content digest), so
a vector that several cells merge is run once; a defense that changes the vectors (DAM's
mask) gets Grams of the vectors it merges.

Hyperparameters (defaults): ``alpha`` 0.95; ``n_images`` 256; ``split`` "train"
(FusionBench: the training split, shuffled); ``batch_size`` 128 (only speed).
"""
from __future__ import annotations

from typing import Any

from mmbench.lazy import torch, F  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import Cost, Merged, Merger, Param, PluginError, Sizes, StateDict
from mmbench.vectors import digest, float_items


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 − α) Diag(G)."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_update(grams: list[torch.Tensor], deltas: list[torch.Tensor], alpha: float,
                   transposed: bool = False) -> torch.Tensor:
    """The merged update of one layer: [(Σ G̃_k)⁻¹ Σ G̃_k ΔW_kᵀ]ᵀ for torch weights (out × in);
    with ``transposed`` the weight is applied as x @ W (in × out) and the update is
    (Σ G̃_k)⁻¹ Σ G̃_k ΔW_k. Float64, returned as float32."""
    g = [shrink(gk.double(), alpha) for gk in grams]
    rhs = sum(gk @ (d.double() if transposed else d.double().T) for gk, d in zip(g, deltas))
    solved = torch.linalg.solve(sum(g), rhs)
    return (solved if transposed else solved.T).float()


def attention_input(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``attn.out_proj`` (the heads' outputs, concatenated) for self-attention of
    ``x`` (the ``ln_1`` output), recomputed with the module's in-projection; no mask."""
    if not attn.batch_first:
        x = x.transpose(0, 1)                       # (L, N, D) → (N, L, D)
    n, length, d = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)   # (N, H, L, d/H)
    return out.transpose(1, 2).reshape(n, length, d)


class _Grams:
    """Running sums of x xᵀ per weight name, filled by forward hooks on one encoder."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1, x.shape[-1])
        s = x.T @ x
        self.sums[name] = self.sums[name] + s if name in self.sums else s
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def means(self) -> dict[str, torch.Tensor]:
        return {k: (v / self.counts[k]).float().cpu() for k, v in self.sums.items()}


def collect_grams(module: torch.nn.Module, batches, device) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Gram matrices of every supported layer of an open_clip vision tower over ``batches``:
    (weight name → Gram, notes on what could not be hooked)."""
    grams, handles, notes = _Grams(), [], []
    modules = dict(module.named_modules())
    for name, sub in modules.items():
        if name.endswith(".ln_1") and f"{name[:-5]}.attn" in modules:
            block = name[:-5]
            attn = modules[f"{block}.attn"]

            def hook_ln1(_m, _inputs, out, block=block, attn=attn):
                grams.add(f"{block}.attn.in_proj_weight", out)
                if isinstance(attn, torch.nn.MultiheadAttention) and attn._qkv_same_embed_dim:
                    grams.add(f"{block}.attn.out_proj.weight", attention_input(attn, out))
            handles.append(sub.register_forward_hook(hook_ln1))
        elif isinstance(sub, torch.nn.Linear) and name.endswith((".mlp.c_fc", ".mlp.c_proj")):
            handles.append(sub.register_forward_pre_hook(
                lambda _m, inputs, name=name: grams.add(f"{name}.weight", inputs[0])))
    pools_token = (getattr(module, "attn_pool", None) is None and getattr(module, "pool_type", "tok") == "tok"
                   and not getattr(module, "final_ln_after_pool", False) and hasattr(module, "ln_post")
                   and isinstance(getattr(module, "proj", None), torch.nn.Parameter))
    if pools_token:
        handles.append(module.ln_post.register_forward_hook(lambda _m, _i, out: grams.add("proj", out[:, 0])))
    else:
        notes.append("proj: the tower does not pool the class token after ln_post; averaged")
    try:
        with torch.no_grad():
            for x in batches:
                module(x.to(device))
    finally:
        for h in handles:
            h.remove()
    return grams.means(), notes


class RegMean(Merger):
    name = "regmean"
    description = "RegMean: per linear layer, the closed-form merge that matches every task's outputs on its own inputs"
    params = {
        "alpha": Param(0.95, "float", min=0, max=1,
                       help="α: off-diagonal shrinkage of the Gram matrices (FusionBench's CLIP config 0.95)"),
        "n_images": Param(256, "int", min=1, help="images of each task whose layer inputs make its Grams"),
        "split": Param("train", "str", choices=("train", "dev"), help="where those images come from"),
        "batch_size": Param(128, "int", min=1, help="images per forward pass (speed only)"),
    }

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost:
        return Cost(eval_images=params["n_images"] * len(sizes.tasks),
                    note="one forward pass per contributor over its Gram images (cached by vector)")

    def grams(self, ctx, pretrained: StateDict, task: str, vector: StateDict,
              params: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
        def compute():
            weights = {k: v + vector[k] if k in vector else v for k, v in pretrained.items()}
            module = ctx.encoder(weights).eval()
            gen = ctx.generator("regmean.images", task)
            batches = (x for x, _ in ctx.data(task).batches(params["split"], params["batch_size"], shuffle=True,
                                                             generator=gen, limit=params["n_images"]))
            grams, notes = collect_grams(module, batches, ctx.device)
            return grams, {"notes": notes, "layers": len(grams)}
        key = {"task": task, "vector": digest(vector), "n_images": params["n_images"],
               "split": params["split"]}
        tensors, info = ctx.cached("regmean.gram", key, compute, label=task)
        return tensors, info.get("notes", [])

    def merge(self, pretrained: StateDict, task_vectors: dict[str, StateDict],
              ctx: Any, params: dict[str, Any]) -> Merged:
        params = {**self.defaults, **params}
        if not task_vectors:
            raise PluginError("regmean: no task vectors to merge")
        tasks = list(task_vectors)
        vectors = {t: float_items(task_vectors[t]) for t in tasks}
        grams, notes = {}, set()
        for t in tasks:
            grams[t], why = self.grams(ctx, pretrained, t, vectors[t], params)
            notes.update(why)
        names = [n for n in pretrained if all(n in vectors[t] for t in tasks)]
        merged = dict(pretrained)
        solved, averaged = [], []
        with torch.no_grad():
            for name in names:
                deltas = [vectors[t][name] for t in tasks]
                base = pretrained[name]
                if all(name in grams[t] for t in tasks) and deltas[0].dim() == 2:
                    update = regmean_update([grams[t][name] for t in tasks], deltas, params["alpha"],
                                            transposed=(name == "proj"))
                    solved.append(name)
                else:
                    update = torch.stack([d.float() for d in deltas]).mean(0)
                    averaged.append(name)
                merged[name] = (base.float() + update).to(base.dtype)
        missing = [n for n in names if n.endswith(("in_proj_weight", "out_proj.weight", "c_fc.weight",
                                                   "c_proj.weight")) and n not in solved]
        if missing:
            ctx.log(f"regmean: {len(missing)} linear weights had no Gram and were averaged")
        info = {"alpha": params["alpha"], "solved_tensors": len(solved), "averaged_tensors": len(averaged),
                "linear_without_gram": missing, "notes": sorted(notes)}
        return Merged(merged, info)


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(RegMean())

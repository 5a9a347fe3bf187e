"""open_clip models: build by name (custom tiny configs registered offline), load
weights (open_clip tag, local checkpoint, or the tiny presets' pretraining stage),
and build frozen per-task heads.

Only the image tower is fine-tuned and merged; the text tower serves the base's
contrastive pretraining (tiny presets) and zero-shot heads (paper presets).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .api import StateDict
from .presets import ModelSpec, Preset

_registered: set[str] = set()
_registered_filter: list[bool] = []


def _register_config(spec: ModelSpec) -> None:
    import open_clip

    if spec.config is None or spec.name in _registered:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{spec.name}.json"
        path.write_text(json.dumps(spec.config))
        open_clip.add_model_config(path)
    _registered.add(spec.name)


def _quiet_open_clip() -> None:
    # open_clip logs a warning for every randomly initialised model; tiny presets always are
    logging.getLogger().addFilter(lambda record: "No pretrained weights loaded" not in record.getMessage())


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def checkpoint_path(spec: ModelSpec) -> Path | None:
    """The local checkpoint file that ``spec.pretrained`` names, checked: None for no
    checkpoint or an open_clip tag; a :class:`~mmbench.plugins.UsageError` of one line when a
    path (an existing name, or one that looks like a path) is missing, a folder or unreadable."""
    from .plugins import UsageError

    value = spec.pretrained
    if not value:
        return None
    path = Path(os.path.expanduser(value))
    where = f"model {spec.name!r}: checkpoint {value}"
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.sep in value or value.startswith((".", "~")) or value.endswith(CHECKPOINT_SUFFIXES):
            raise UsageError(f"{where} does not exist") from None
        return None  # an open_clip tag such as 'openai'
    except OSError as exc:  # a folder on the way that cannot be searched
        raise UsageError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if path.is_dir():
        raise UsageError(f"{where} is a folder, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise UsageError(f"{where} cannot be read: {exc.strerror or exc}") from None
    return path


def create_clip(spec: ModelSpec, *, load_pretrained: bool = True) -> torch.nn.Module:
    """The whole open_clip model (image + text towers) on the CPU, in fp32.

    ``spec.pretrained`` may be an open_clip tag (needs the hub, paper presets) or a
    local checkpoint file (loaded by open_clip with ``weights_only=True``). A local
    checkpoint that is missing, unreadable or not loadable is a one-line
    :class:`~mmbench.plugins.UsageError`, not a traceback.
    """
    import open_clip

    from .plugins import UsageError

    _register_config(spec)
    if not _registered_filter:
        _quiet_open_clip()
        _registered_filter.append(True)
    pretrained = spec.pretrained if load_pretrained else None
    local = checkpoint_path(spec) if pretrained else None
    try:
        model = open_clip.create_model(spec.name, pretrained=str(local) if local else pretrained,
                                       weights_only=True)
    except Exception as exc:
        if local is None:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UsageError(f"model {spec.name!r}: checkpoint {spec.pretrained} cannot be loaded: "
                         f"{type(exc).__name__}: {first}"[:500]) from None
    return model.float().eval()


def tokenizer(spec: ModelSpec) -> Callable:
    import open_clip

    _register_config(spec)
    return open_clip.get_tokenizer(spec.name)


def encoder_state(model: torch.nn.Module) -> StateDict:
    """θ of the image encoder: its float parameters (no buffers: the ViT has none that merge)."""
    return {k: v.detach().clone() for k, v in model.visual.named_parameters()}


def contrastive_pretrain(model: torch.nn.Module, spec: ModelSpec, images: torch.Tensor,
                         captions: list[str], generator: torch.Generator,
                         progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict:
    """CLIP-style contrastive pretraining of a randomly initialised tiny model.

    Reconstructed for the tiny presets (measured before the project began): AdamW (lr ``spec.pretrain_lr``,
    wd 0.1), one-cycle schedule, ``spec.pretrain_steps`` steps of batch
    ``spec.pretrain_batch_size``; the token embedding stays frozen (a tiny text
    tower otherwise overfits the few captions). Batches contain one caption per
    image; duplicate captions in a batch are treated as positives too.
    """
    tok = tokenizer(spec)
    unique = sorted(set(captions))
    caption_index = torch.tensor([unique.index(c) for c in captions])
    tokens = tok(unique)
    model.train()
    model.token_embedding.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.pretrain_lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.pretrain_lr, total_steps=spec.pretrain_steps)
    n, bs = images.shape[0], spec.pretrain_batch_size
    loss_value = float("nan")
    for _ in progress(range(spec.pretrain_steps)):
        idx = torch.randint(0, n, (bs,), generator=generator)
        cap = caption_index[idx]
        img = F.normalize(model.encode_image(images[idx]), dim=-1)
        text_unique = F.normalize(model.encode_text(tokens), dim=-1)
        txt = text_unique[cap]
        logits = model.logit_scale.exp() * img @ txt.T
        same = (cap[:, None] == cap[None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_value = loss.item()
    model.eval()
    model.token_embedding.weight.requires_grad_(True)
    return {"final_loss": loss_value, "logit_scale": model.logit_scale.exp().item()}


def orthogonal_heads(class_counts: dict[str, int], embed_dim: int, scale: float,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fixed random orthonormal class vectors, disjoint across tasks, times ``scale``.

    One random orthogonal matrix; task t takes the next C_t columns, so every
    class vector is orthogonal to every other class of every task. Measurements before the project
    found heads from a tiny text tower overlapping across tasks (e.g. "cat" in
    two tasks), which made merges conflict; these cannot.
    """
    total = sum(class_counts.values())
    if total > embed_dim:
        raise ValueError(f"orthogonal heads need embed_dim ≥ total classes ({total} > {embed_dim})")
    q, _ = torch.linalg.qr(torch.randn(embed_dim, embed_dim, generator=generator))
    heads, offset = {}, 0
    for task, count in class_counts.items():
        heads[task] = (q[:, offset:offset + count].T * scale).contiguous()
        offset += count
    return heads


@torch.no_grad()
def zeroshot_head(model: torch.nn.Module, tok: Callable, class_names: Iterable[str],
                  templates: Iterable[str]) -> torch.Tensor:
    """Zero-shot head (docs/methods.md): per class, the mean over templates of the
    L2-normalised text embedding, renormalised, times logit_scale.exp()."""
    templates = list(templates)
    rows = []
    for name in class_names:
        emb = F.normalize(model.encode_text(tok([t.format(name) for t in templates])), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows) * model.logit_scale.exp()


def build_encoder(preset: Preset) -> torch.nn.Module:
    """A fresh image encoder module of the preset's architecture (weights to be loaded)."""
    return create_clip(preset.model, load_pretrained=False).visual


# --------------------------------------------------------------------------- #
# shipped base models (``mmbench pretrain``): image tower + heads in one safetensors file
# --------------------------------------------------------------------------- #

BASE_FORMAT = "mmbench-base/1"


def save_base_file(path: str | os.PathLike, visual: StateDict, logit_scale: float,
                   heads: dict[str, torch.Tensor], class_names: dict[str, Iterable[str]],
                   recipe: dict) -> None:
    """Write a base model as the papers release one: the image encoder's weights and, as
    their zero-shot heads, each task's class embeddings from the text tower (the text tower
    itself is not needed to fine-tune, merge or evaluate, and is not shipped).

    Keys ``visual.<param>`` and ``head.<task>``; metadata ``format``, ``recipe`` (the
    canonical JSON of what built it), ``class_names`` and ``logit_scale``. Written to a
    temporary name and renamed, so an interrupted write leaves no half file."""
    from safetensors.torch import save_file

    from .keys import canonical_json

    tensors = {f"visual.{k}": v.detach().float().contiguous().clone() for k, v in visual.items()}
    tensors.update({f"head.{t}": h.detach().float().contiguous().clone() for t, h in heads.items()})
    meta = {"format": BASE_FORMAT, "recipe": canonical_json(recipe),
            "class_names": canonical_json({t: list(c) for t, c in class_names.items()}),
            "logit_scale": repr(float(logit_scale))}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # a file to ship: readable by everyone
    os.replace(tmp, path)


def base_file_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The metadata of an mmbench base file, or None for any other checkpoint."""
    if not str(path).endswith(".safetensors"):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 -- not a safetensors file: not a base file
        return None
    return meta if meta.get("format") == BASE_FORMAT else None


def read_base_file(path: str | os.PathLike) -> tuple[StateDict, float, dict[str, torch.Tensor],
                                                     dict[str, list[str]], dict]:
    """(image-encoder weights, logit scale, heads, class names per task, recipe) of a base file."""
    from safetensors.torch import load_file

    meta = base_file_metadata(path)
    if meta is None:
        raise ValueError(f"{path} is not an mmbench base file (format {BASE_FORMAT})")
    tensors = load_file(str(path))
    visual = {k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")}
    heads = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    return (visual, float(meta["logit_scale"]), heads, json.loads(meta["class_names"]),
            json.loads(meta["recipe"]))

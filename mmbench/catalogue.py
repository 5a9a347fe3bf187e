"""The built-in presets: ``tiny`` (the default benchmark), ``smoke`` (a sanity check in
seconds) and the paper presets (CLIP ViT-B-32 / B-16 / L-14 on 6 or 8 hub datasets).

Registered through ``mmbench_register_presets`` (entry point ``presets``), the hook a
third-party package uses for its own presets; the classes are in :mod:`mmbench.presets`.
"""
from __future__ import annotations

import mmbench

from pathlib import Path
from typing import Any

from .presets import ModelSpec, Preset, Recipe, TaskSpec

# The tiny ViT of the embedded presets (open_clip config format).
TINY_VIT = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
SMOKE_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

# The six tasks of ``tiny`` (docs/presets.md "tiny"): real images that install from the package
# registries. The training images of each are cut into train | dev | pretrain in that order
# (mmbench.data), so the shipped base's pretraining images (TINY_BASE, n_pretrain) never
# overlap the train or dev images of ``tiny`` (same n_train and n_dev) or any test image.
def _tiny_tasks(pretrain: bool) -> tuple[TaskSpec, ...]:
    def task(name, source, args, n_train, n_dev, n_test, n_pretrain, epochs=None):
        return TaskSpec(name, source, args, n_train, n_dev, n_test, n_pretrain if pretrain else 0,
                        None if pretrain else epochs)
    return (
        task("fashion_mnist", "fashion_mnist", {"size": 32}, 4000, 500, 1000, 5000),
        task("animal_mnist", "animal_mnist", {"size": 32}, 4000, 500, 1000, 1500),
        task("digits", "digits", {"size": 32}, 1000, 200, 450, 140, epochs=15),
        task("font_letters", "font_letters", {"size": 32, "n_train_per_class": 800, "n_test_per_class": 150},
             4000, 500, 1000, 3000),
        task("photo_patches", "photo_patches", {"size": 32, "n_train_per_class": 1200, "n_test_per_class": 300},
             4000, 500, 1000, 3000),
        task("texture_patches", "texture_patches", {"size": 32, "n_train_per_class": 1200,
                                                    "n_test_per_class": 300}, 4000, 500, 1000, 3000),
    )


# How tiny's shipped base model was built (`mmbench pretrain`): CLIP-style contrastive
# pretraining of the tiny ViT from random initialisation on the six tasks' held-out pretrain
# images, each captioned with one of its task's prompt templates and, for the even-numbered
# classes, the class name (the others: the task's concept, "a photo of a handwritten digit.";
# a base captioned with every class name was measured at 82 % zero-shot on Fashion-MNIST
# where fine-tuning reached 83 %, leaving nothing for task vectors to add), then the
# zero-shot heads from the text tower. Longer than a cold run could afford, as the papers
# start from released CLIP weights; not a benchmark preset (not registered).
TINY_BASE = Preset(
    name="tiny-base",
    description="the recipe of tiny's shipped base model (mmbench pretrain --preset tiny)",
    model=ModelSpec(name="mmbench-tiny-vit", config=TINY_VIT, pretrain_steps=4000, pretrain_named="even"),
    tasks=_tiny_tasks(pretrain=True),
    image_size=32,
    heads="zeroshot",
)
WEIGHTS = Path(__file__).resolve().parent / "weights"
# The shipped file's sha256 (tests/test_pretrain.py checks the file and its recorded recipe).
TINY_BASE_FILE = WEIGHTS / "tiny-base.safetensors"
TINY_BASE_SHA256 = "46417d19c88e847242d70794a501bfb1808901e6604beea0d1a51b77292599be"

TINY = Preset(
    name="tiny",
    description="6 real 32x32 tasks (Fashion-MNIST, Animal-MNIST, digits, font letters, photo and texture "
                "patches), a tiny open_clip ViT from a shipped pretrained base; CPU",
    model=ModelSpec(name="mmbench-tiny-vit", config=TINY_VIT, pretrained=str(TINY_BASE_FILE)),
    tasks=_tiny_tasks(pretrain=False),
    image_size=32,
    heads="base",
    # The papers' full fine-tuning of the image encoder; lr 1e-4 instead of their 1e-5 (reconstructed
    # for a tiny model and 5 epochs). The earlier tiny froze the patch embedding and first block
    # because its base was too weak; from the shipped base, freezing them lowered every task's
    # fine-tuned dev ACC (seed 0: 72-83 % frozen against 76-97 % full; docs/presets.md).
    recipe=Recipe(lr=1e-4, weight_decay=0.1, batch_size=128, epochs=5, schedule="onecycle",
                  warmup_steps=0, grad_clip=1.0),
    adversary_task="fashion_mnist",
    target_class=0,
    eval_batch_size=1000,
    # the published leaderboard: three seeds, each figure a mean with its 95 % t-interval
    # (docs/presets.md "Results")
    seeds=(0, 1, 2),
    # Every value below comes from a rule that uses only what the choosing party can know, on
    # dev splits (docs/presets.md "Selection rules"; re-derive with `mmbench tune`, sweeps in
    # docs/tuning/): the merger's user maximises the clean merge's normalised dev ACC (TA λ
    # 0.5; TIES k 0.2, λ 1.1; DARE λ 0.5 at p 0.5; TSV-M α 2.0); the attacker its own model's
    # dev ASR at ≤ 2 points of dev ACC (BadNets' rate; SBV's backdoor vectors are BadNets
    # fine-tunes with BadNets' settings; BadMerging's patch, seed 0: 3×3 px, every size tried
    # reached 100 % dev ASR and none kept ACC within 2 points). BadTV's 8×8 patch is carried
    # over from the earlier tiny's dev sweep, not re-derived here. The rest is compute budget,
    # fixed without looking at any result: BadMerging's trigger search, and AdaMerging/DAM
    # with fewer, larger steps than the papers. Swept afterwards on dev (docs/presets.md): the
    # merger's rule would take AdaMerging 500 steps at 5e-3 (+1.4 dev points; still below
    # TIES), and DAM at the public code's 1000 steps at 1e-3 still leaves its mask at 0.5.
    plugin_params={"ta": {"lambda": 0.5}, "ties": {"k": 0.2, "lambda": 1.1}, "dare": {"lambda": 0.5},
                   "tsvm": {"alpha": 2.0},
                   "badnets": {"poison_rate": 0.3},
                   "badmerging": {"patch_area": 0.01, "trigger_epochs": 2, "trigger_images_per_epoch": 100,
                                  "trigger_max_iterations": 20},
                   "badmerging_off": {"trigger_epochs": 2, "num_augmentations": 50},
                   # LoBAM: BadMerging's trigger search budget as above; LoRA rank scaled to the width
                   # (ALGORITHMS-2's r 16 at B-32's 768 ≈ 2 %; 4 of 128 here, α/r kept at 2), fixed
                   # before any tiny result; lr the default 10 × recipe (1e-3)
                   "lobam": {"patch_area": 0.01, "trigger_epochs": 2, "trigger_images_per_epoch": 100,
                             "trigger_max_iterations": 20, "rank": 4, "lora_alpha": 8.0},
                   "badtv": {"patch_area": 0.0625},
                   "sbv": {"poison_rate": 0.3},
                   "sbv_sc": {"poison_rate": 0.3},
                   "adamerging": {"steps": 100, "lr": 5e-3},
                   "dam": {"steps": 100, "mask_lr": 3e-3},
                   # AWM and SAU (opt-in here): compute budget, declared before any tiny result of theirs.
                   # Unlike DAM's mask (one per attack, shared by every merger) theirs is learnt per
                   # cell, after the merger; a step measured 1.0 s (AWM) and 2.2 s (SAU) beside a
                   # 2-worker run, so the papers' 2000 steps would take over 20 and 40 min a cell.
                   # 50 steps with every Adam lr × 40 keeps the papers' lr × steps (as AdaMerging's does)
                   "awm": {"steps": 50, "lr": 4e-2, "adv_lr": 4e-3},
                   "sau": {"steps": 50, "lr": 4e-2, "adv_lr": 4e-3},
                   # MergeBackdoor: the code's 10 epochs (not the preset's 5) and BadNets' 4×4 px patch.
                   # Chosen on the attacker's own dev figures (seed 0, TA): at the preset's 5 epochs its
                   # shadow merge θ_pre + ½(τ_A + τ_B) reached a dev ASR of 4.8 % with the paper's
                   # relative size (1 px here), 6.1 % with 2×2 and 9.3 % with 4×4, still rising: trained
                   # too briefly to carry the backdoor (docs/presets.md)
                   "merge_backdoor": {"patch_area": 0.015625, "epochs": 10}},
    # run only when named: the published leaderboard holds their cells for seeds 0-2 (docs/presets.md), but
    # their per-cell masks add about 30 min a seed to a plain `mmbench run`, so they stay opt-in for cost.
    # Not in any key: taking a name out keeps its cells (fine-pruning left this list with its 3 seeds)
    opt_in=("awm", "sau"),
)

# the shipped base models `mmbench pretrain --preset NAME` rebuilds: preset → (recipe, file)
BASE_RECIPES: dict[str, tuple[Preset, Path]] = {"tiny": (TINY_BASE, TINY_BASE_FILE)}

SMOKE = Preset(
    name="smoke",
    description="2 tiny tasks (sklearn digits, photo patches) at 16x16, a 2-layer ViT: a sanity check (a merge must clear the base model), the whole cross product cold in under a minute on 2 cores",
    model=ModelSpec(name="mmbench-smoke-vit", config=SMOKE_VIT, pretrain_steps=60, pretrain_batch_size=64),
    tasks=(
        TaskSpec("digits", "digits", {"size": 16}, 900, 100, 300, 300),
        TaskSpec("photo_patches", "photo_patches", {"size": 16, "n_train_per_class": 160,
                                                    "n_test_per_class": 40}, 900, 100, 300, 300),
    ),
    image_size=16,
    heads="orthogonal",
    recipe=Recipe(lr=3e-3, weight_decay=0.1, batch_size=64, epochs=5, schedule="onecycle",
                  warmup_steps=0, grad_clip=1.0, frozen=("conv1",)),
    adversary_task="digits",
    target_class=0,
    eval_batch_size=512,
    # seconds, not fidelity: the smoke preset exercises every plugin's code path
    # ta and ties: λ chosen by `mmbench tune` on clean dev ACC, seed 0 (docs/tuning/smoke-*.json), so
    # that the clean merge (dev ACC 34.5 TA, 30.0 TIES, 29.0 DARE) stands well clear of the base model (≈ 11, chance)
    plugin_params={"ta": {"lambda": 1.0}, "ties": {"lambda": 1.5}, "dare": {"lambda": 1.0},
                   "dam": {"steps": 5}, "adamerging": {"steps": 20},
                   # the detection track's trigger search: seconds, not a real search (the defaults are 100 / 64)
                   "trigger_inversion": {"steps": 10, "n_images": 16},
                   "badmerging": {"trigger_epochs": 1, "trigger_images_per_epoch": 20, "trigger_max_iterations": 10},
                   # lobam's LoRA lr: the recipe's 3e-3 (10x of it, the default, diverged on smoke)
                   "lobam": {"trigger_epochs": 1, "trigger_images_per_epoch": 20, "trigger_max_iterations": 10,
                             "lr": 3e-3},
                   "badmerging_off": {"trigger_epochs": 1, "num_augmentations": 20, "pgd_steps": 5,
                                      "trigger_max_iterations": 5},
                   # a 100-image dev split resolves 1 point: SBV's default 2-point ACC tolerance (2 images) left
                   # it no ASR on the smoke base (sbv 0.0 %); 10 points = 10 images
                   "sbv": {"n": 2, "acc_tolerance": 0.1}, "sbv_sc": {"n": 2, "acc_tolerance": 0.1},
                   # fine-pruning's fine-tune: 20 steps, not 200 (a smoke cell 5.7 s → under 1 s)
                   "fine_pruning": {"finetune_steps": 20},
                   "awm": {"steps": 5}, "sau": {"steps": 5}},
    # as on tiny (their tests run them on smoke by name): the whole cross product stays 144 cells
    opt_in=("awm", "fine_pruning", "sau"),
)


# Paper presets (docs/presets.md "Paper presets"): open_clip ViTs with OpenAI weights,
# datasets from the Hugging Face hub (mmbench.hf), the shared recipe of docs/methods.md.
# The OpenAI weights were trained with QuickGELU: open_clip 3.x builds plain "ViT-B-32"
# with GELU (and only warns), so the paper architectures are the "-quickgelu" configs.
PAPER_ARCHS = {"vit-b-32": "ViT-B-32-quickgelu", "vit-b-16": "ViT-B-16-quickgelu",
               "vit-l-14": "ViT-L-14-quickgelu"}
PAPER_EVAL_BATCH = {"vit-b-32": 512, "vit-b-16": 512, "vit-l-14": 256}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)   # open_clip.OPENAI_DATASET_MEAN
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)   # open_clip.OPENAI_DATASET_STD


def hf_task(task: str, path: str, revision: str | None, epochs: float, config: str | None = None,
            **source_args: Any) -> TaskSpec:
    """A paper task: a hub dataset (``config``: its subset) with image/label columns, the whole
    train split (less a 10 % dev split, ≤ 5000) and the whole test split."""
    args = {"path": path, "revision": revision, "train_split": "train", "test_split": "test",
            "image_column": "image", "label_column": "label", **source_args}
    if config is not None:
        args["name"] = config
    return TaskSpec(task, "hf", args, n_train=None, n_dev=None, n_test=None, epochs=epochs)


# Ids and revisions: FusionBench's tanganke/* copies where they exist. Each revision is a
# commit seen in a stored copy of the hub page (not checked online here; docs/presets.md);
# None = unpinned (the data stage records the commit it resolved to). Epochs ≈ 2000 steps
# of batch 128 (task_vectors / BadMerging finetune_clean.py; Pets 77 from BadMerging).
PAPER_TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    hf_task("cifar100", "tanganke/cifar100", "7de7416777eb0bca0194ab35ac1c1b297f1d6b26", 5,
            rename={"cra": "crab"}),
    hf_task("gtsrb", "tanganke/gtsrb", "ea889fff70dda7b09e94a4b207dded438deca549", 11),
    hf_task("eurosat", "tanganke/eurosat", "43750fc422c7fbd4289e2df3f7473617a5937acc", 12),
    hf_task("cars", "tanganke/stanford_cars", "9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40", 35),
    hf_task("sun397", "tanganke/sun397", "9c4afd6174afa3974f209a0ef099dbbe244dfd27", 14),
    hf_task("pets", "timm/oxford-iiit-pet", "10b688881011725fa2fa3d856a47536c9a7e6968", 77),
    hf_task("resisc45", "tanganke/resisc45", "refs/pr/1", 15),
    hf_task("svhn", "ufldl-stanford/svhn", "f9e1717d73324ebbc1ece84267ccd80d0aca0690", 4,
            config="cropped_digits"),
    hf_task("mnist", "ylecun/mnist", None, 5),
    hf_task("dtd", "tanganke/dtd", "d2afa97d9f335b1a6b3b09c637aef667f98f966e", 76),
    hf_task("imagenet100", "clane9/imagenet-100", "dd6859fcd34d100536a604f715357462f829bcf5", 3,
            test_split="validation"),
)}

PAPER_TASK_SETS: dict[str, tuple[tuple[str, ...], str, int, str]] = {
    # name: (tasks, adversary task, target class, description)
    "6task": (("cifar100", "gtsrb", "eurosat", "cars", "sun397", "pets"), "cifar100", 1,
              "BadMerging's 6 tasks (CIFAR100 adversary, target class 1)"),
    "8task": (("sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"), "sun397", 1,
              "the task-arithmetic 8 tasks (adversary: first task, reconstructed)"),
    "cifar100": (("cifar100",), "cifar100", 1, "Backdoor Vectors on CIFAR100 (target class reconstructed)"),
    "imagenet100": (("imagenet100",), "imagenet100", 1,
                    "Backdoor Vectors on ImageNet100 (target class reconstructed)"),
}

PAPER_RECIPE = Recipe(lr=1e-5, weight_decay=0.1, batch_size=128, epochs=1.0, schedule="cosine",
                      warmup_steps=500, grad_clip=1.0)


def paper_preset(arch: str = "vit-b-32", task_set: str = "6task") -> Preset:
    """A paper preset, named ``<arch>-<task_set>`` (e.g. ``vit-b-16-8task``)."""
    if arch not in PAPER_ARCHS:
        raise KeyError(f"unknown arch {arch!r}; known: {', '.join(PAPER_ARCHS)}")
    tasks, adversary, target, what = PAPER_TASK_SETS[task_set]
    model = PAPER_ARCHS[arch]
    return Preset(
        name=f"{arch}-{task_set}",
        description=f"{what}; open_clip {model} 'openai', HF datasets, paper recipe; GPU + hub",
        model=ModelSpec(name=model, pretrained="openai"),
        tasks=tuple(PAPER_TASKS[t] for t in tasks),
        image_size=224,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        heads="zeroshot",
        recipe=PAPER_RECIPE,
        adversary_task=adversary,
        target_class=target,
        eval_batch_size=PAPER_EVAL_BATCH[arch],
        seeds=(0, 1, 2),
    )


PAPER_PRESETS = tuple(paper_preset(a, s) for a in PAPER_ARCHS for s in PAPER_TASK_SETS)


@mmbench.hookimpl
def mmbench_register_presets(register):
    register(TINY)
    register(SMOKE)
    for preset in PAPER_PRESETS:
        register(preset)

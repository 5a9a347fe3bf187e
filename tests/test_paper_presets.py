"""The paper presets' code paths, offline: HF loader on local parquet, a local open_clip
checkpoint, zero-shot heads from a text tower, the preset definitions, and `mmbench plan`.

Nothing here touches the network (a guard makes any socket connection fail) and every
fixture is generated in tmp_path at run time: tiny images, a 2-layer ViT.
"""
from __future__ import annotations

import json
import socket
from dataclasses import replace

import numpy as np
import pytest
import torch

from mmbench import hf, models, presets, zeroshot
from mmbench.cli import main
from mmbench.context import SharedStages
from mmbench.presets import SMOKE_VIT, ModelSpec, Preset, Recipe
from mmbench.store import Store

PAPER = {p.name: p for p in presets.PAPER_PRESETS}
EPOCHS = {"cifar100": 5, "gtsrb": 11, "eurosat": 12, "cars": 35, "sun397": 14, "pets": 77,
          "resisc45": 15, "svhn": 4, "mnist": 5, "dtd": 76, "imagenet100": 3}
RAW_NAMES = ["apple", "cra", "maple_tree", "SeaLake", "British Shorthair"]
N_TRAIN, N_TEST = 40, 12


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("MMBENCH_HF_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("MMBENCH_NUM_WORKERS", raising=False)


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    """A small dataset in the hub's format: `image` (datasets Image) and `label` (ClassLabel)."""
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("parquet")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=RAW_NAMES)})
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        rows = {"image": [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(n)],
                "label": [i % len(RAW_NAMES) for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / f"{split}.parquet"))
    return root


def local(spec: presets.TaskSpec, root) -> presets.TaskSpec:
    """A paper task pointed at the local parquet files, keeping its splits, columns and renames."""
    args = {k: v for k, v in spec.source_args.items() if k not in ("path", "revision", "name")}
    args["path"] = "parquet"
    args["data_files"] = {args["train_split"]: str(root / "train.parquet"),
                          args["test_split"]: str(root / "test.parquet")}
    return replace(spec, source_args=args)


def tiny_checkpoint(tmp_path, suffix: str = ".pt") -> tuple[ModelSpec, dict]:
    spec = ModelSpec(name="mmbench-test-paper-vit", config=SMOKE_VIT)
    torch.manual_seed(0)
    model = models.create_clip(spec)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return replace(spec, pretrained=str(path)), state


# -- preset definitions -----------------------------------------------------------------
def test_paper_presets_are_registered():
    from mmbench.plugins import load

    names = load().names("preset")
    for arch in ("vit-b-32", "vit-b-16", "vit-l-14"):
        for task_set in ("6task", "8task", "cifar100", "imagenet100"):
            assert f"{arch}-{task_set}" in names


def test_paper_preset_definitions():
    import open_clip

    six = PAPER["vit-b-32-6task"]
    assert six.task_names == ("cifar100", "gtsrb", "eurosat", "cars", "sun397", "pets")
    assert six.adversary_task == "cifar100" and six.target_class == 1
    assert PAPER["vit-b-32-8task"].task_names == ("sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb",
                                                  "mnist", "dtd")
    assert PAPER["vit-b-32-cifar100"].task_names == ("cifar100",)
    assert PAPER["vit-b-32-imagenet100"].task_names == ("imagenet100",)
    assert PAPER["vit-b-16-6task"].model.name == "ViT-B-16-quickgelu"
    assert PAPER["vit-l-14-8task"].model.name == "ViT-L-14-quickgelu"
    for preset in PAPER.values():
        assert preset.model.pretrained == "openai" and preset.model.name.endswith("-quickgelu")
        assert preset.image_size == 224 and preset.heads == "zeroshot"
        assert preset.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
        assert preset.std == tuple(open_clip.OPENAI_DATASET_STD)
        assert preset.adversary_task in preset.task_names
        r = preset.recipe
        assert (r.lr, r.weight_decay, r.batch_size, r.schedule, r.warmup_steps, r.grad_clip, r.frozen) == \
            (1e-5, 0.1, 128, "cosine", 500, 1.0, ())
        for task in preset.tasks:
            assert task.source == "hf" and task.epochs == EPOCHS[task.name]
            assert (task.n_train, task.n_dev, task.n_test) == (None, None, None)
            a = task.source_args
            assert a["path"] and "revision" in a and a["image_column"] == "image" and a["label_column"] == "label"
            assert set(a) <= hf.KNOWN_ARGS
    assert PAPER["vit-b-32-6task"].task("cifar100").source_args["path"] == "tanganke/cifar100"
    assert PAPER["vit-b-32-8task"].task("svhn").source_args["name"] == "cropped_digits"


def test_task_epochs_override_the_recipe_only_where_set(tmp_path):
    shared = SharedStages(PAPER["vit-b-32-6task"], Store(tmp_path), torch.device("cpu"))
    assert shared.recipe("cars").epochs == 35 and shared.recipe("cars").lr == 1e-5
    assert shared.finetune_key("cars", 0) != shared.finetune_key("pets", 0)
    # tasks without their own epochs keep their keys (no "epochs" entry appears): smoke has
    # none, tiny's digits alone has 15
    assert all("epochs" not in t for t in presets.SMOKE.key()["tasks"])
    assert [t.get("epochs") for t in presets.TINY.key()["tasks"]] == [None, None, 15, None, None, None]
    tiny = SharedStages(presets.TINY, Store(tmp_path), torch.device("cpu"))
    assert tiny.recipe("fashion_mnist") is presets.TINY.recipe
    assert tiny.recipe("digits").epochs == 15 and tiny.recipe("digits").lr == presets.TINY.recipe.lr


# -- HF loader on local parquet ---------------------------------------------------------
@pytest.mark.parametrize("task", sorted(presets.PAPER_TASKS))
def test_hf_loader_reads_every_paper_task_format(task, parquet_dir, tmp_path):
    spec = local(presets.PAPER_TASKS[task], parquet_dir)
    preset = replace(PAPER["vit-b-32-6task"], name="fixture", tasks=(spec,), image_size=16,
                     adversary_task=spec.name)
    shared = SharedStages(preset, Store(tmp_path / "store"), torch.device("cpu"))
    td = shared.task_data(task)
    assert isinstance(td, hf.HFTaskData) and td.num_workers == 0 and not td.pin_memory
    expected = [hf.prompt_name(spec.source_args.get("rename", {}).get(n, n)) for n in RAW_NAMES]
    assert list(td.class_names) == expected
    n_dev = round(0.1 * N_TRAIN)
    assert (td.size("train"), td.size("dev"), td.size("test")) == (N_TRAIN - n_dev, n_dev, N_TEST)
    low, high = td.valid_range()
    x, y = next(td.batches("test", 5))
    assert x.shape == (5, 3, 16, 16) and y.dtype == torch.int64
    assert (x >= low - 1e-5).all() and (x <= high + 1e-5).all()
    xt, yt = td.tensors("test")
    assert xt.shape == (N_TEST, 3, 16, 16) and torch.equal(xt[:5], x) and torch.equal(yt[:5], y)
    # training batches: shuffled by the generator, augmented by open_clip's train transform
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ya = torch.cat([b[1] for b in td.batches("train", 8, shuffle=True, generator=g1)])
    yb = torch.cat([b[1] for b in td.batches("train", 8, shuffle=True, generator=g2)])
    assert torch.equal(ya, yb) and len(ya) == td.size("train")
    assert len(list(td.batches("dev", 3, limit=2))) == 1
    # the stage is stored (indices + provenance) and reused
    _, info = shared.store.load(shared.data_key(task))
    assert info["source"]["path"] == "parquet" and info["source"]["resolved_revision"] is None
    assert info["raw_class_names"] == RAW_NAMES and info["sizes"]["dev"] == n_dev
    assert shared.data_sources()[task]["path"] == "parquet"


def test_hf_splits_are_disjoint_and_deterministic():
    spec = replace(presets.PAPER_TASKS["cifar100"], n_pretrain=7)
    a, b = hf.split_indices(spec, 1000, 300), hf.split_indices(spec, 1000, 300)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (len(a["dev"]), len(a["pretrain"]), len(a["train"]), len(a["test"])) == (100, 7, 893, 300)
    assert len(set(a["dev"]) | set(a["pretrain"]) | set(a["train"])) == 1000
    big = hf.split_indices(spec, 100_000, 10)
    assert len(big["dev"]) == hf.DEV_MAX


def test_hf_loader_errors_are_one_line(tmp_path):
    from mmbench.data import DataError

    spec = presets.TaskSpec("x", "hf", {"path": "parquet", "data_files": {"train": str(tmp_path / "none.parquet"),
                                                                        "test": str(tmp_path / "none.parquet")}})
    with pytest.raises(DataError, match="data file .*none.parquet does not exist"):
        hf.load_splits(spec)
    with pytest.raises(DataError, match="unknown hf source_args"):
        hf.load_splits(presets.TaskSpec("x", "hf", {"path": "parquet", "colour": 1}))


def test_prompt_names():
    assert hf.prompt_name("maple_tree") == "maple tree"
    assert hf.prompt_name("SeaLake") == "sea lake"
    assert hf.prompt_name("AnnualCrop") == "annual crop"
    assert hf.prompt_name("AM General Hummer SUV 2000") == "AM General Hummer SUV 2000"
    assert hf.prompt_name("7") == "7"


# -- models: local checkpoint, zero-shot heads ------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_create_clip_loads_a_local_checkpoint(tmp_path, suffix):
    spec, state = tiny_checkpoint(tmp_path, suffix)
    torch.manual_seed(123)  # a different random init: the weights must come from the file
    loaded = models.create_clip(spec).state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_zeroshot_heads_from_a_text_tower(tmp_path):
    spec, _ = tiny_checkpoint(tmp_path)
    model = models.create_clip(spec)
    tok = models.tokenizer(spec)
    task = presets.PAPER_TASKS["gtsrb"]
    names = ["stop", "yield", "speed limit 30"]
    head = zeroshot.build_head(model, tok, names, task, device="cpu")
    assert head.shape == (3, SMOKE_VIT["embed_dim"]) and head.device.type == "cpu"
    scale = float(model.logit_scale.detach().exp())
    assert torch.allclose(head.norm(dim=-1), torch.full((3,), scale), rtol=1e-4)
    templates = zeroshot.templates_for(task)
    assert templates == zeroshot.TEMPLATES["gtsrb"]
    with torch.no_grad():  # row 0 by hand: mean of normalised template embeddings, renormalised, × scale
        e = torch.nn.functional.normalize(model.encode_text(tok([t.format("stop") for t in templates])), dim=-1)
        manual = torch.nn.functional.normalize(e.mean(0), dim=-1) * scale
    assert torch.allclose(head[0], manual, atol=1e-5)


def test_every_paper_task_has_family_templates():
    for name, spec in presets.PAPER_TASKS.items():
        family = zeroshot.template_family(spec)
        assert family != "generic", name
        assert all(t.count("{}") == 1 for t in zeroshot.templates_for(spec))
    assert zeroshot.templates_for(presets.TaskSpec("mystery", "hf", {"path": "x"})) == zeroshot.GENERIC


# -- a paper-shaped preset end to end on fixtures ----------------------------------------
def test_paper_pipeline_on_fixtures(parquet_dir, tmp_path):
    """Local checkpoint by path → zero-shot heads → HF tasks → fine-tunes → a cell whose
    result records each task's dataset id and revision."""
    from mmbench.context import SharedStages
    from mmbench.run import run

    model, _ = tiny_checkpoint(tmp_path)
    tasks = (replace(local(presets.PAPER_TASKS["cifar100"], parquet_dir), epochs=1),
             replace(local(presets.PAPER_TASKS["svhn"], parquet_dir), epochs=2))
    preset = Preset(name="paper-fixture", description="fixture", model=model, tasks=tasks, image_size=16,
                    mean=presets.OPENAI_MEAN, std=presets.OPENAI_STD, heads="zeroshot",
                    recipe=Recipe(lr=1e-4, batch_size=8, epochs=1, warmup_steps=2),
                    adversary_task="cifar100", target_class=1, eval_batch_size=16)
    store = Store(tmp_path / "store")
    [result] = run(preset, store, ["none"], ["ta"], ["none"]).results
    assert result["status"] == "ok", result.get("error")
    assert result["data"]["cifar100"] == {"source": "hf", "path": "parquet", "name": None, "revision": None,
                                          "resolved_revision": None}
    assert set(result["data"]) == {"cifar100", "svhn"}
    shared = SharedStages(preset, store, torch.device("cpu"), quiet=True)
    heads = shared.heads()
    assert heads["cifar100"].shape == (len(RAW_NAMES), SMOKE_VIT["embed_dim"])
    # svhn fine-tuned for its own 2 epochs: 36 train rows // 8 = 4 steps per epoch
    _, info = store.load(shared.finetune_key("svhn", 0))
    assert info["steps"] == 8
    saved = json.loads(store.result_path("paper-fixture", result["cell"]).read_text())
    assert saved["data"]["svhn"]["path"] == "parquet"


# -- plan ---------------------------------------------------------------------------------
def test_plan_runs_offline_with_nothing_cached(tmp_path, capsys):
    assert main(["plan", "--preset", "vit-b-32-6task", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for task in PAPER["vit-b-32-6task"].task_names:
        assert f"data[{task}]" in out and f"finetune[{task}, seed 0]" in out
    assert "1755 steps" in out  # CIFAR100: (50000 − 5000 dev) // 128 × 5 epochs
    assert "0 of " in out and "estimated GPU time for the rest" in out and "2000 img/s" in out
    assert "cell none/ta/none seed 0" in out
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "results").exists()


def test_plan_counts_cached_stages_and_batch_override(tmp_path, capsys):
    preset = PAPER["vit-b-32-6task"]
    shared = SharedStages(preset, Store(tmp_path), torch.device("cpu"))
    Store(tmp_path).save(shared.data_key("pets"), "data", {"train.indices": torch.arange(3)},
                         {"sizes": {"train": 3000, "dev": 300, "test": 3669}})
    assert main(["plan", "--preset", "vit-b-32-6task", "--store", str(tmp_path), "--attack", "none",
                 "--merger", "ta", "--defense", "none", "--batch-size", "64", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "1 of 17 stages cached" in out and "batch 64" in out
    assert "3515 steps" in out  # CIFAR100 at batch 64: 45000 // 64 × 5
    assert "train 3000 / test 3669 (data stage)" in out


def test_autocast_is_a_no_op_on_cpu():
    from mmbench.train import autocast

    with autocast(torch.device("cpu")):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32
    assert hf.default_workers("cpu") == 0

"""Fine-pruning's pieces on hand-checkable tensors, and the defense end to end on smoke."""
from __future__ import annotations

import pytest
import torch

from mmbench_plugins.defenses.fine_pruning import choose_pruned, last_mlp, prune, pruning_order


def mlp_weights(blocks: int = 1) -> dict[str, torch.Tensor]:
    w = {}
    for i in range(blocks):
        p = f"transformer.resblocks.{i}.mlp"
        w[f"{p}.c_fc.weight"] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        w[f"{p}.c_fc.bias"] = torch.tensor([5.0, 6.0])
        w[f"{p}.c_proj.weight"] = torch.tensor([[7.0, 8.0]])
    return w


def test_last_mlp_is_the_highest_block_by_number():
    w = mlp_weights(11)  # blocks 0..10: "10" sorts before "9" as text
    assert last_mlp(w) == ("transformer.resblocks.10.mlp.c_fc", "transformer.resblocks.10.mlp.c_proj")


def test_prune_zeroes_a_units_row_bias_and_column_and_copies():
    w = mlp_weights()
    fc, proj = last_mlp(w)
    out = prune(w, fc, proj, torch.tensor([1]))
    assert out[f"{fc}.weight"].tolist() == [[1.0, 2.0], [0.0, 0.0]]
    assert out[f"{fc}.bias"].tolist() == [5.0, 0.0]
    assert out[f"{proj}.weight"].tolist() == [[7.0, 0.0]]
    assert w[f"{fc}.weight"].tolist() == [[1.0, 2.0], [3.0, 4.0]]  # the merge itself is untouched


def test_pruning_order_is_by_increasing_activation_ties_by_index():
    assert pruning_order(torch.tensor([0.5, 0.1, 0.5, 0.0])).tolist() == [3, 1, 0, 2]


def test_stop_before_the_dev_acc_drop_exceeds_the_threshold():
    # the merge at 0.90; steps 1, 2 lose 0 and 0.05; step 3 loses 0.11 > 0.10: keep 2 steps
    assert choose_pruned([0.90, 0.90, 0.85, 0.79], 0.10) == 2
    assert choose_pruned([0.90, 0.85, 0.80], 0.10) == 2      # exactly 0.10 is allowed
    assert choose_pruned([0.90, 0.70], 0.10) == 0             # the first step already costs too much
    assert choose_pruned([0.90, 0.95, 0.91], 0.04) == 2       # ACC may rise while pruning


def test_fine_pruning_on_smoke(smoke_store):
    """The whole defense on smoke's clean TA merge, called as the harness calls it, with a
    shorter fine-tune (its own figures checked; the CLI path is the other defenses')."""
    from mmbench import presets
    from mmbench.api import BoundMerger
    from mmbench.context import RunContext, SharedStages
    from mmbench.plugins import load
    from mmbench.store import Store
    from mmbench_plugins.defenses.fine_pruning import FinePruning

    ctx = RunContext(SharedStages(presets.SMOKE, Store(smoke_store), torch.device("cpu"), quiet=True), 0)
    pre = ctx.pretrained()
    vectors = {t: ctx.task_vector(t) for t in ctx.tasks}
    ta = load().get("merger", "ta").obj
    merger = BoundMerger(ta, {**ta.defaults, **presets.SMOKE.plugin_params["ta"]}, ctx)
    merged = merger(pre, vectors)
    params = {**FinePruning.defaults, "finetune_steps": 20}
    out = FinePruning().defend(pre, vectors, merger, ctx, params)
    info = out.info
    fc, proj = last_mlp(out.weights)
    assert fc == "transformer.resblocks.1.mlp.c_fc"                # the last of smoke's 2 blocks
    assert info["units"] == 128 and 0 < info["pruned"] <= 128      # smoke's MLP: 4 × width 32
    dev = sum(ctx.accuracy(merged.weights, t, split="dev") for t in ctx.tasks) / len(ctx.tasks)
    assert info["dev_acc_merged"] == pytest.approx(dev)             # the scan starts at the merge
    assert info["dev_acc_pruned"] >= info["dev_acc_merged"] - 0.10 - 1e-9
    assert info["finetune_steps"] == 20
    # the pruned units are still zero after fine-tuning: rows of c_fc, its bias, columns of c_proj
    dead = out.weights[f"{fc}.weight"].abs().sum(1) == 0
    assert int(dead.sum()) >= info["pruned"]
    assert (out.weights[f"{fc}.bias"][dead] == 0).all() and (out.weights[f"{proj}.weight"][:, dead] == 0).all()
    assert not torch.equal(out.weights[f"{fc}.weight"], merged.weights[f"{fc}.weight"])  # it trained


def test_the_replay_scan_gives_the_whole_models_dev_accuracy(smoke_store):
    """LastBlockScan skips the blocks before the last: its mean dev ACC must be the harness's
    (every task's correct / images on the dev split), pruned or not."""
    from mmbench import presets
    from mmbench.context import RunContext, SharedStages
    from mmbench.store import Store
    from mmbench_plugins.defenses.fine_pruning import LastBlockScan

    ctx = RunContext(SharedStages(presets.SMOKE, Store(smoke_store), torch.device("cpu"), quiet=True), 0)
    tasks = list(ctx.tasks)
    weights = {k: v + ctx.task_vector(tasks[0])[k] for k, v in ctx.pretrained().items()}
    fc, proj = last_mlp(weights)
    scan = LastBlockScan(ctx, weights, tasks, fc, proj)
    for units in ([], list(range(0, 128, 2)), list(range(120))):
        w = prune(weights, fc, proj, torch.tensor(units, dtype=torch.long))
        whole = sum(ctx.accuracy(w, t, split="dev") for t in tasks) / len(tasks)
        assert scan.mean_accuracy(w) == pytest.approx(whole, abs=1e-12), len(units)


def test_the_incremental_scan_matches_the_whole_model_and_the_scores(smoke_store):
    """IncrementalScan subtracts pruned units' terms from the last block's output instead of
    rerunning anything: its dev ACC must be the whole model's (up to float rounding: equal here)
    for growing prefixes, for a set that is not a continuation, and its scores the plain pass's."""
    from mmbench import presets
    from mmbench.context import RunContext, SharedStages
    from mmbench.store import Store
    from mmbench_plugins.defenses.fine_pruning import FinePruning, IncrementalScan

    ctx = RunContext(SharedStages(presets.SMOKE, Store(smoke_store), torch.device("cpu"), quiet=True), 0)
    tasks = list(ctx.tasks)
    weights = {k: v + ctx.task_vector(tasks[0])[k] for k, v in ctx.pretrained().items()}
    fc, proj = last_mlp(weights)
    assert IncrementalScan.supported(ctx.encoder(weights), fc, proj)
    scan = IncrementalScan(ctx, weights, tasks, fc, proj)
    assert torch.allclose(scan.scores, FinePruning.scores(ctx, weights, tasks, proj), atol=1e-6)
    order = pruning_order(scan.scores)
    seen = set()
    for units in (order[:0], order[:10], order[:60], order[:128], order[5:20]):
        w = prune(weights, fc, proj, units)
        whole = sum(ctx.accuracy(w, t, split="dev") for t in tasks) / len(tasks)
        seen.add(round(whole, 6))
        assert scan.mean_accuracy(units) == pytest.approx(whole, abs=1e-12), units.numel()
    assert len(seen) >= 3  # the prunings do change the accuracy: the comparison means something

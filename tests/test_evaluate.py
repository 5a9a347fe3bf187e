"""The metrics (mmbench/evaluate.py) on hand-built predictions, and through the harness's real
evaluation path (SharedStages on the smoke store) with a stand-in model whose outputs are known."""
from __future__ import annotations

import math

import pytest
import torch

from mmbench import evaluate
from mmbench.api import Trigger

TARGET = 0
#            3 samples of the target class | 7 others
LABELS = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5, 6, 7])
TRIGGERED = torch.tensor([0, 0, 0, 0, 0, 3, 0, 5, 1, 7])   # predictions on the triggered images
CLEAN = torch.tensor([0, 1, 0, 1, 2, 0, 4, 5, 6, 0])       # predictions on the clean images


def test_asr_leaves_out_target_class_samples():
    # non-target samples (index 3..9) predicted [0, 0, 3, 0, 5, 1, 7]: 3 of 7 hit the target
    assert evaluate.asr_counts(TRIGGERED, LABELS, TARGET) == (3, 7)
    # a definition keeping the 3 target-class samples (all "hits") would report 6 of 10
    kept = int((TRIGGERED == TARGET).sum()), len(LABELS)
    assert kept == (6, 10) and 6 / 10 != pytest.approx(3 / 7)


def test_asr_without_target_class_samples_and_with_only_them():
    labels = torch.tensor([1, 2, 3, 4])
    assert evaluate.asr_counts(torch.tensor([0, 0, 2, 4]), labels, 0) == (2, 4)
    assert evaluate.asr_counts(torch.tensor([0, 0]), torch.tensor([0, 0]), 0) == (0, 0)
    assert math.isnan(evaluate.rate(0, 0))


def test_accuracy_counts():
    # correct at index 0, 2, 3, 4, 6, 7, 8
    assert evaluate.accuracy_counts(CLEAN, LABELS) == (7, 10)
    assert evaluate.accuracy_counts(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == (0, 0)
    with pytest.raises(ValueError):
        evaluate.accuracy_counts(CLEAN[:3], LABELS)


def test_wilson_on_values_one_can_check():
    lo, hi = evaluate.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert evaluate.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = evaluate.wilson(10, 10)
    assert lo == pytest.approx(1 - 0.2775, abs=1e-4) and hi == 1.0
    assert evaluate.wilson(3, 7, z=0) == pytest.approx((3 / 7, 3 / 7))
    for n in range(1, 60):  # the estimate always lies inside, exactly at the ends
        for k in range(n + 1):
            lo, hi = evaluate.wilson(k, n)
            assert 0 <= lo <= k / n <= hi <= 1, (k, n)
        assert evaluate.wilson(n, n)[1] == 1.0 and evaluate.wilson(0, n)[0] == 0.0
    assert all(math.isnan(v) for v in evaluate.wilson(0, 0))
    # narrower with more samples, always around the estimate
    wide, narrow = evaluate.wilson(30, 100), evaluate.wilson(300, 1000)
    assert narrow[0] > wide[0] and narrow[1] < wide[1] and narrow[0] < 0.3 < narrow[1]


def test_summarize_one_pass():
    preds = evaluate.Predictions(labels=LABELS, clean=CLEAN, triggered=TRIGGERED)
    out = evaluate.summarize(preds, TARGET)
    assert out["acc"] == 0.7 and out["acc_counts"] == [7, 10]
    assert out["asr"] == pytest.approx(3 / 7) and out["asr_counts"] == [3, 7]
    assert out["asr_ci"] == pytest.approx(list(evaluate.wilson(3, 7)))
    assert "asr" not in evaluate.summarize(evaluate.Predictions(labels=LABELS, clean=CLEAN))


def test_predict_pastes_the_trigger_on_the_same_batches():
    seen = []

    def forward(x):
        seen.append(x.clone())
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] > 0).long(), 3).float()
    images = torch.randn(6, 1, 4, 4)
    images[:, 0, 0, 0] = -1.0
    trigger = Trigger(torch.ones(1, 1, 1), 0, 0)
    batches = [(images[:4], torch.arange(4)), (images[4:], torch.arange(4, 6))]
    out = evaluate.predict(forward, iter(batches), trigger)
    assert out.clean.tolist() == [0] * 6 and out.triggered.tolist() == [1] * 6
    assert out.labels.tolist() == list(range(6))
    assert torch.equal(seen[0], images[:4]) and torch.equal(seen[1], trigger.apply(images[:4]))
    only = evaluate.predict(forward, iter(batches), trigger, clean=False)
    assert only.clean is None and only.triggered.tolist() == [1] * 6


# the harness path --------------------------------------------------------------------------
PATCH_VALUE = 7.0   # normalised images of the smoke preset never reach this
HIT = {0, 1, 2, 3, 4}   # true labels whose triggered images the stand-in sends to the target


class StandIn(torch.nn.Module):
    """An encoder with known outputs. It recognises each test image by its pixels outside the
    trigger square (``labels``: content -> true label) and returns the features of ``head[c]``:
    with the trigger patch present, c = target when the true label is in HIT, else the true label;
    without it, c = the true label when even, else label + 2 mod 10 (wrong, never 0)."""

    def __init__(self, head, trigger, target, labels):
        super().__init__()
        self.head, self.trigger, self.target, self.labels = head, trigger, target, labels

    def forward(self, x):
        t = self.trigger
        h, w = t.pattern.shape[-2:]
        present = (x[..., t.top:t.top + h, t.left:t.left + w] == PATCH_VALUE).flatten(1).all(1)
        true = torch.tensor([self.labels[key] for key in outside_patch(x, t)])
        clean = torch.where(true % 2 == 0, true, (true + 2) % len(self.head))
        hit = torch.tensor([int(c) in HIT for c in true])
        triggered = torch.where(hit, self.target, true)
        return self.head[torch.where(present, triggered, clean)]


def outside_patch(x, trigger):
    h, w = trigger.pattern.shape[-2:]
    keep = torch.ones(x.shape[-2:], dtype=torch.bool)
    keep[trigger.top:trigger.top + h, trigger.left:trigger.left + w] = False
    return [img[:, keep].numpy().tobytes() for img in x]


@pytest.fixture
def harness(smoke_store):
    from mmbench.context import SharedStages
    from mmbench.presets import SMOKE
    from mmbench.store import Store

    shared = SharedStages(SMOKE, Store(smoke_store), torch.device("cpu"), quiet=True)
    task = SMOKE.adversary_task
    data = shared.task_data(task)
    x, y = data.tensors("test")
    trigger = Trigger.at_corner(torch.full((x.shape[1], 4, 4), PATCH_VALUE), SMOKE.image_size)
    labels = {}
    for split in ("test", "dev"):
        xs, ys = data.tensors(split)
        for key, label in zip(outside_patch(xs, trigger), ys.tolist()):
            assert labels.setdefault(key, label) == label, "two images alike outside the patch, other labels"
    shared._encoder_module = StandIn(shared.heads()[task], trigger, SMOKE.target_class, labels)
    return shared, task, trigger, x, y


def test_harness_asr_and_accuracy_match_hand_computed_figures(harness):
    shared, task, trigger, x, y = harness
    target = shared.preset.target_class
    assert target in HIT and (y == target).sum() > 0  # target-class samples are in the split
    hit = torch.tensor([int(c) in HIT for c in y])
    # by hand: clean correct iff the label is even; triggered -> target iff the label is in HIT
    acc = (int((y % 2 == 0).sum()), len(y))
    asr = (int((hit & (y != target)).sum()), int((y != target).sum()))
    wrong = int(hit.sum()) / len(y)  # the ASR a definition keeping target-class samples would give
    assert abs(asr[0] / asr[1] - wrong) > 0.03, (asr, wrong)

    weights: dict = {}  # the stand-in has no parameters
    assert shared.accuracy_counts(weights, task, "test") == acc
    assert shared.accuracy(weights, task) == acc[0] / acc[1]
    assert shared.asr_counts(weights, task, trigger, target) == asr
    assert shared.attack_success_rate(weights, task, trigger, target) == asr[0] / asr[1]
    both = shared.evaluate(weights, task, "test", trigger, target)
    assert both["acc_counts"] == list(acc) and both["asr_counts"] == list(asr)
    assert both["asr"] == asr[0] / asr[1] and both["acc"] == acc[0] / acc[1]
    assert both["asr_ci"] == list(evaluate.wilson(*asr))
    preds, labels = shared.predictions(weights, task, "test", trigger, exclude_class=target)
    assert len(labels) == asr[1] and int((preds == target).sum()) == asr[0]
    # the dev split is another set of images
    _, yd = shared.task_data(task).tensors("dev")
    assert shared.accuracy_counts(weights, task, "dev") == (int((yd % 2 == 0).sum()), len(yd))
    assert shared.asr_counts(weights, task, trigger, target, "dev") == (
        int(torch.tensor([int(c) in HIT and c != target for c in yd]).sum()), int((yd != target).sum()))
    # without the trigger's patch nothing is sent to the target (the clean predictions)
    none = Trigger.at_corner(torch.zeros(x.shape[1], 4, 4), shared.preset.image_size)
    assert shared.asr_counts(weights, task, none, target) == (0, asr[1])

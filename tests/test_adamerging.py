"""AdaMerging with a fake Context: a tiny Linear encoder, two tasks (plugins/mergers/adamerging.py)."""
import copy
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mmbench.api import Merged, PluginError
from mmbench_plugins.mergers import adamerging, ties
from mmbench_plugins.mergers.adamerging import AdaMerging

IN, HIDDEN, EMBED, CLASSES = 6, 8, 4, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops gain nothing from intra-op threads, and on a busy 2-core machine their barriers
    made these tests 40× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyEncoder(torch.nn.Module):
    """Counts every instance made, by construction or by copy.deepcopy (both go through __new__)."""

    instances = 0

    def __new__(cls, *args, **kwargs):
        TinyEncoder.instances += 1
        return super().__new__(cls)

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, EMBED)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))  # an integer buffer

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class FakeData:
    def __init__(self, name, images, labels, log):
        self.name, self.images, self.labels, self.log = name, images, labels, log
        self.class_names = tuple(str(c) for c in range(CLASSES))

    def tensors(self, split):
        return self.images, self.labels

    def batches(self, split, batch_size, *, shuffle=False, generator=None, limit=None):
        self.log.append((self.name, split, shuffle, generator is not None))
        order = torch.randperm(len(self.images), generator=generator) if shuffle else torch.arange(len(self.images))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield self.images[index], self.labels[index]


class FakeContext:
    """Just what AdaMerging uses: forward (functional_call on ONE module), data, generator, progress, log, head."""

    device = torch.device("cpu")
    seed = 0

    def __init__(self, tasks=("a", "b"), samples=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.tasks = tuple(tasks)
        self.module = TinyEncoder()
        self.heads = {t: torch.randn(CLASSES, EMBED, generator=g) * 3 for t in tasks}
        self.batch_log, self.progress_log, self.messages = [], [], []
        self.forward_calls = 0
        self._data = {t: FakeData(t, torch.randn(samples, IN, generator=g),
                                  torch.randint(CLASSES, (samples,), generator=g), self.batch_log) for t in tasks}

    def pretrained(self):
        return {n: v.clone() for n, v in self.module.state_dict().items() if torch.is_floating_point(v)}

    def head(self, task):
        return self.heads[task]

    def logits(self, features, task):
        return F.normalize(features, dim=-1) @ self.heads[task].T

    def forward(self, weights, images, task=None):
        self.forward_calls += 1
        features = functional_call(self.module, weights, (images,))
        return features if task is None else self.logits(features, task)

    def encoder(self, weights=None):  # AdaMerging must not call this: it would build a module per step
        module = TinyEncoder()
        module.load_state_dict(weights or {}, strict=False)
        return module

    def data(self, task):
        return self._data[task]

    def generator(self, *salt):
        return torch.Generator().manual_seed(zlib.crc32(repr((self.seed, salt)).encode()))

    def progress(self, iterable, total=None, desc=""):
        self.progress_log.append((desc, len(iterable)))
        return iterable

    def log(self, message):
        self.messages.append(message)

    # test helper: mean entropy over ALL images of every task at the given weights
    def full_entropy(self, weights):
        with torch.no_grad():
            return sum(float(adamerging.mean_entropy(self.forward(weights, self._data[t].images, t)))
                       for t in self.tasks)


def make_case(seed=0, scale=0.5):
    ctx = FakeContext(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    pretrained = ctx.pretrained()
    task_vectors = {t: {n: torch.randn(v.shape, generator=g) * scale for n, v in pretrained.items()}
                    for t in ctx.tasks}
    return ctx, pretrained, task_vectors


def run(params, seed=0, **case):
    ctx, pretrained, task_vectors = make_case(seed, **case)
    result = AdaMerging().merge(pretrained, task_vectors, ctx, params)
    return ctx, pretrained, task_vectors, result


def by_hand(pretrained, task_vectors, lambdas, layers):
    """θ_pre + Σ_k λ_pk τ_kp, written out, for the returned (clamped) λ."""
    expected = {}
    for i, name in enumerate(layers):
        per_task = lambdas[i] if isinstance(lambdas[0], list) else lambdas
        weight = pretrained[name]
        for k, tv in enumerate(task_vectors):
            weight = weight + torch.tensor(per_task[k]) * tv[name]
        expected[name] = weight
    return expected


def test_layer_wise_lambdas_are_p_by_k():
    ctx, pretrained, _, result = run({"steps": 3})
    assert isinstance(result, Merged)
    info = result.info
    assert info["granularity"] == "layer"
    assert info["tasks"] == ["a", "b"]
    assert info["layers"] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert len(info["lambdas"]) == 4 and all(len(row) == 2 for row in info["lambdas"])
    assert isinstance(info["final_entropy"], float) and len(info["entropy"]) == 3


def test_task_wise_lambdas_are_k():
    *_, result = run({"granularity": "task", "steps": 3})
    lambdas = result.info["lambdas"]
    assert result.info["granularity"] == "task"
    assert len(lambdas) == 2 and all(isinstance(x, float) for x in lambdas)


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_coefficients_stay_inside_the_clamp(granularity):
    *_, result = run({"granularity": granularity, "steps": 30, "lr": 0.3, "clamp": [0.1, 0.45]})
    values = torch.tensor(result.info["lambdas"]).reshape(-1)
    assert values.min() >= 0.1 and values.max() <= 0.45
    assert not torch.all(values == 0.3)  # the coefficients did move


def test_the_clamp_applies_while_training_not_only_to_the_result():
    # clamp [0.3, 0.3]: every step merges with λ = 0.3, so the full-batch loss never moves
    *_, result = run({"steps": 8, "lr": 0.3, "clamp": [0.3, 0.3], "batch_size": 40})
    history = torch.tensor(result.info["entropy"])
    assert torch.allclose(history, history[0], rtol=0, atol=1e-5)


def test_clamp_upper_bound_above_one_is_allowed():
    # no hidden [0, 1]: coefficients started at 2 stay near 2 after a few small steps
    ctx, pretrained, task_vectors, result = run(
        {"granularity": "task", "steps": 5, "lr": 0.01, "init": 2.0, "clamp": [0.0, 3.0]})
    values = torch.tensor(result.info["lambdas"])
    assert values.min() > 1.9 and values.max() < 2.1
    expected = by_hand(pretrained, list(task_vectors.values()), result.info["lambdas"], result.info["layers"])
    assert all(torch.equal(result.weights[n], expected[n]) for n in result.info["layers"])


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_entropy_decreases(granularity):
    ctx, pretrained, task_vectors, result = run(
        {"granularity": granularity, "steps": 40, "lr": 0.1, "clamp": [0.0, 2.0], "init": 0.3, "batch_size": 40})
    layers = result.info["layers"]
    start = by_hand(pretrained, list(task_vectors.values()),
                    [[0.3, 0.3]] * len(layers) if granularity == "layer" else [0.3, 0.3], layers)
    before, after = ctx.full_entropy(start), ctx.full_entropy(result.weights)
    assert after < 0.97 * before, (before, after)
    history = result.info["entropy"]  # full-data batches: the training loss itself went down
    assert history[-1] < 0.97 * history[0]


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_weights_are_theta_pre_plus_clamped_lambda_tau(granularity):
    ctx, pretrained, task_vectors, result = run(
        {"granularity": granularity, "steps": 25, "lr": 0.2, "clamp": [0.0, 0.5]})
    lambdas, layers = result.info["lambdas"], result.info["layers"]
    flat = torch.tensor(lambdas).reshape(-1)
    assert flat.min() >= 0.0 and flat.max() <= 0.5
    assert ((flat == 0.0) | (flat == 0.5)).any(), flat  # the clamp was hit (at either bound)
    expected = by_hand(pretrained, list(task_vectors.values()), lambdas, layers)
    assert result.weights.keys() == pretrained.keys()
    for name in layers:
        assert torch.equal(result.weights[name], expected[name]), name
        assert not result.weights[name].requires_grad


def test_integer_buffers_and_tensors_without_task_vector_are_kept():
    ctx, pretrained, task_vectors = make_case()
    pretrained["calls"] = torch.tensor(5)
    for tv in task_vectors.values():
        del tv["fc2.bias"]
    result = AdaMerging().merge(pretrained, task_vectors, ctx, {"steps": 2})
    assert result.info["layers"] == ["fc1.weight", "fc1.bias", "fc2.weight"]
    assert torch.equal(result.weights["fc2.bias"], pretrained["fc2.bias"])
    assert torch.equal(result.weights["calls"], torch.tensor(5))


def test_forward_never_copies_the_module():
    ctx, pretrained, task_vectors = make_case()
    module_state = copy.deepcopy(ctx.module.state_dict())
    instances = TinyEncoder.instances
    AdaMerging().merge(pretrained, task_vectors, ctx, {"steps": 7})
    assert TinyEncoder.instances == instances  # no new module, no deepcopy
    assert ctx.forward_calls == 7 + 1      # every step (and the final entropy): one batched forward over both tasks
    assert all(torch.equal(v, module_state[n]) for n, v in ctx.module.state_dict().items())


def test_batches_are_unlabelled_shuffled_from_the_split_and_cycled():
    # 40 images, batch 16: 3 batches per pass, so 10 steps start new passes
    ctx, *_ = run({"steps": 10})
    assert ctx.progress_log == [("adamerging", 10)]
    assert {(task, split) for task, split, *_ in ctx.batch_log} == {("a", "dev"), ("b", "dev")}
    assert all(shuffle and has_generator for _, _, shuffle, has_generator in ctx.batch_log)
    assert len(ctx.batch_log) >= 2 * 4
    ctx, *_ = run({"steps": 2, "split": "test"})
    assert {split for _, split, *_ in ctx.batch_log} == {"test"}


def test_is_reproducible():
    *_, first = run({"steps": 10, "lr": 0.05})
    *_, second = run({"steps": 10, "lr": 0.05})
    assert first.info["lambdas"] == second.info["lambdas"]


def test_plus_merges_ties_sign_resolved_vectors():
    ctx, pretrained, task_vectors, result = run({"plus": True, "ties_k": 0.3, "steps": 10, "lr": 0.1})
    assert result.info["plus"] is True
    resolved = ties.sign_resolved(list(task_vectors.values()), k=0.3)
    expected = by_hand(pretrained, resolved, result.info["lambdas"], result.info["layers"])
    for name in result.info["layers"]:
        assert torch.equal(result.weights[name], expected[name]), name
    plain = by_hand(pretrained, list(task_vectors.values()), result.info["lambdas"], result.info["layers"])
    assert not torch.equal(result.weights["fc1.weight"], plain["fc1.weight"])


def test_registers_through_the_hook_with_its_defaults():
    registered = []
    adamerging.mmbench_register_mergers(registered.append)
    (plugin,) = registered
    assert plugin.name == "adamerging" and plugin.kind == "merger"
    assert plugin.defaults == {"granularity": "layer", "steps": 500, "lr": 1e-3, "batch_size": 16, "init": 0.3,
                               "clamp": [0.0, 1.0], "split": "dev", "plus": False, "ties_k": 0.2}


@pytest.mark.parametrize("params", [
    {"granularity": "block"}, {"clamp": [1.0, 0.0]}, {"clamp": 1.0}, {"init": 1.5}, {"batch_size": 0},
])
def test_bad_parameters_are_plugin_errors(params):
    with pytest.raises(PluginError):
        run({"steps": 1, **params})


def test_hook_matches_the_hookspec(registrations):
    registered = registrations(adamerging, "mmbench_register_mergers")
    assert [type(p) for p in registered] == [adamerging.AdaMerging]

import torch

from mmbench import vectors


def test_subtract_skips_integer_buffers():
    a = {"w": torch.tensor([3.0, 5.0]), "steps": torch.tensor([7])}
    b = {"w": torch.tensor([1.0, 1.0]), "steps": torch.tensor([2])}
    assert vectors.subtract(a, b).keys() == {"w"}
    assert vectors.subtract(a, b)["w"].tolist() == [2.0, 4.0]


def test_weighted_sum_and_add():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([10.0, 20.0])}
    assert vectors.weighted_sum([a, b], [0.5, 0.1])["w"].tolist() == [1.5, 3.0]
    assert vectors.add(a, b, scale=-1)["w"].tolist() == [-9.0, -18.0]
    assert a["w"].tolist() == [1.0, 2.0]  # inputs untouched


def test_topk_is_global_not_per_layer():
    # 5 entries; the top 40% (2 entries) are both in layer "a": layer "b" loses everything
    v = {"a": torch.tensor([5.0, -4.0, 0.1]), "b": torch.tensor([1.0, -2.0])}
    kept = vectors.topk(v, 0.4)
    assert kept["a"].tolist() == [5.0, -4.0, 0.0]
    assert kept["b"].tolist() == [0.0, 0.0]


def test_topk_keeps_ties_at_threshold():
    v = {"a": torch.tensor([3.0, -3.0, 1.0, 3.0])}
    # k = 2 of 4, threshold |3|: all three entries of magnitude 3 are kept
    assert vectors.topk_mask(v, 0.5)["a"].tolist() == [True, True, False, True]


def test_flatten_roundtrip_and_cosine():
    v = {"b": torch.arange(6.0).view(2, 3), "a": torch.tensor([1.0])}
    flat = vectors.flatten(v)
    assert flat.tolist() == [1.0, 0, 1, 2, 3, 4, 5]  # sorted by name
    back = vectors.unflatten(flat, v)
    assert all(torch.equal(back[k], v[k]) for k in v)
    assert abs(vectors.cosine(v, v) - 1.0) < 1e-9
    assert abs(vectors.cosine({"x": torch.tensor([1.0, 0])}, {"x": torch.tensor([0.0, 2])})) < 1e-9

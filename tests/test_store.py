import json

import pytest
import torch

from mmbench.store import Store, stage_key


def test_stage_key_is_canonical_and_sensitive():
    k1 = stage_key("finetune", {"lr": 1e-4, "task": "a"}, ["x", "y"], ("mmbench", "0.1"))
    k2 = stage_key("finetune", {"task": "a", "lr": 1e-4}, ["x", "y"], ("mmbench", "0.1"))
    assert k1 == k2  # key order does not matter
    assert k1 != stage_key("finetune", {"lr": 2e-4, "task": "a"}, ["x", "y"], ("mmbench", "0.1"))
    assert k1 != stage_key("finetune", {"lr": 1e-4, "task": "a"}, ["x", "z"], ("mmbench", "0.1"))
    assert k1 != stage_key("finetune", {"lr": 1e-4, "task": "a"}, ["x", "y"], ("mmbench", "0.2"))


def test_roundtrip_and_sha_verification(tmp_path):
    store = Store(tmp_path)
    key = "ab" * 32
    store.save(key, "test", {"w": torch.tensor([1.0, 2.0])}, {"note": "hi"})
    tensors, info = store.load(key)
    assert tensors["w"].tolist() == [1.0, 2.0] and info == {"note": "hi"}
    path = tmp_path / "artifacts" / "ab" / f"{key}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip a bit in the tensor payload
    path.write_bytes(bytes(data))
    assert store.load(key) is None  # a bad artifact is treated as missing
    assert store.corrupt and key[:12] in store.corrupt[0]


def test_no_temporary_files_left_and_no_pickle(tmp_path):
    store = Store(tmp_path)
    store.save("cd" * 32, "test", {"w": torch.zeros(3)}, {})
    files = sorted(p.name for p in (tmp_path / "artifacts" / "cd").iterdir())
    assert files == ["cd" * 32 + ".json", "cd" * 32 + ".safetensors"]
    meta = json.loads((tmp_path / "artifacts" / "cd" / ("cd" * 32 + ".json")).read_text())
    assert len(meta["sha256"]) == 64
    # the tensor file is safetensors: an 8-byte header length, then a JSON header
    raw = (tmp_path / "artifacts" / "cd" / ("cd" * 32 + ".safetensors")).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + header_len])["w"]["dtype"] == "F32"


def test_failed_write_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(Exception):
        store.save("ef" * 32, "test", {"w": "not a tensor"}, {})
    folder = tmp_path / "artifacts" / "ef"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_a_stage_two_workers_need_is_computed_once(tmp_path):
    # two runners (own memory, one store) ask for the same stage at once: the store's lock
    # makes the second wait for the first and load its artifact instead of recomputing it
    import threading
    import time

    from mmbench.context import SharedStages
    from mmbench.presets import SMOKE

    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.5)
        return {"w": torch.tensor([3.0, 4.0])}, {"n": len(calls)}

    got = []

    def worker():
        shared = SharedStages(SMOKE, Store(tmp_path), torch.device("cpu"), quiet=True)
        got.append(shared.stage("shared thing", "cd" * 32, "test", compute))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert [g[0]["w"].tolist() for g in got] == [[3.0, 4.0]] * 2 and [g[1] for g in got] == [{"n": 1}] * 2


def test_tensors_sharing_memory_are_stored_apart(tmp_path):
    # a merger may return views of one buffer; safetensors refuses shared memory, the store copies
    flat = torch.arange(6.0)
    store = Store(tmp_path)
    store.save("ef" * 32, "merge", {"a": flat[:3], "b": flat[3:], "c": flat}, {})
    tensors, _ = store.load("ef" * 32)
    assert tensors["a"].tolist() == [0, 1, 2] and tensors["b"].tolist() == [3, 4, 5] and len(tensors["c"]) == 6


def test_info_that_is_not_json_fails_before_any_write(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(TypeError, match="not JSON-able"):
        store.save("aa" * 32, "merge", {"w": torch.zeros(2)}, {"bad": object()})
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.tmp"))


def test_results_read_once_answer_as_reading_each_time(tmp_path):
    # mmbench leaderboard asks for every preset's results four times; read once, the answers match
    store = Store(tmp_path)
    for preset, cells in (("a", ["x__ta__none__seed1", "x__ta__none__seed0"]), ("b", ["y__ta__none__seed0"])):
        for cell in cells:
            store.save_result(preset, cell, {"cell": cell, "preset": preset, "status": "ok"})
    (tmp_path / "results" / "b" / "broken.json").write_text("{not json")
    fresh = {p: Store(tmp_path).results(p) for p in (None, "a", "b", "c")}
    assert [r["cell"] for r in fresh["a"]] == ["x__ta__none__seed0", "x__ta__none__seed1"]
    assert fresh["b"][0]["status"] == "unreadable" and fresh["c"] == []
    store.read_results_once()
    assert {p: store.results(p) for p in (None, "a", "b", "c")} == fresh
    store.save_result("a", "z__ta__none__seed0", {"cell": "z__ta__none__seed0", "preset": "a", "status": "ok"})
    assert len(store.results("a")) == 2                                 # read once: later files are not seen
    assert len(Store(tmp_path).results("a")) == 3 and len(store.unreadable) == 1

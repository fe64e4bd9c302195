"""Aggregation is reproducible and the soft-target file round-trips (no Ray: the router trains in-process)."""

import numpy as np
import pytest
import torch

from moekd_ray.config import load_config
from moekd_ray.partition import code_features
from moekd_ray.stages.aggregate import aggregate, fit_gate, load_soft_targets, save_soft_targets

FUNCS = [f"int f{i}(int a) {{ return a {'+' if i % 2 else '*'} {i}; }}" for i in range(40)]


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 2, 40) for s in ("train", "valid")}
    logits = {s: rng.normal(size=(40, 3, 2)).astype(np.float32) for s in ("train", "valid")}
    features = {s: code_features(FUNCS, 256) for s in ("train", "valid")}
    return features, logits, labels


def run(cfg, inputs):
    features, logits, labels = inputs
    torch.set_num_threads(1)
    return aggregate(cfg, logits, fit_gate(cfg, features, logits, labels, log=lambda *_: None), labels)


def test_same_config_gives_identical_soft_targets(inputs):
    cfg = load_config(None, ["experts.k=3", "router.epochs=15", "distill.temperature=4"])
    a, b = run(cfg, inputs), run(cfg, inputs)
    for split in a:
        for name in a[split]:
            np.testing.assert_array_equal(a[split][name], b[split][name])
    np.testing.assert_allclose(a["train"]["soft_targets"].sum(1), 1.0, atol=1e-6)


def test_another_seed_gives_another_router(inputs):
    a = run(load_config(None, ["experts.k=3", "router.epochs=15"]), inputs)
    b = run(load_config(None, ["experts.k=3", "router.epochs=15", "seed=1"]), inputs)
    assert not np.allclose(a["train"]["gate_logits"], b["train"]["gate_logits"])


def test_uniform_router_is_the_plain_mean(inputs):
    out = run(load_config(None, ["experts.k=3", "router.kind=uniform"]), inputs)["train"]
    mean = torch.softmax(torch.from_numpy(inputs[1]["train"]), -1).mean(1).numpy()
    np.testing.assert_allclose(out["mixture_probs"], mean, atol=1e-6)


def test_soft_target_file_round_trips(inputs, tmp_path):
    targets = run(load_config(None, ["experts.k=3", "router.epochs=5"]), inputs)
    path = tmp_path / "soft_targets.safetensors"
    save_soft_targets(targets, path, {"config_digest": "abc"})
    back = load_soft_targets(path)
    assert set(back) == {"train", "valid"} and not path.with_suffix(".tmp").exists()
    for split in targets:
        for name, arr in targets[split].items():
            np.testing.assert_array_equal(back[split][name], arr)


def test_damaged_soft_target_file_is_detected(tmp_path):
    import pytest

    targets = {"train": {"soft_targets": np.random.default_rng(0).random((64, 2), dtype=np.float32)}}
    path = tmp_path / "soft.safetensors"
    save_soft_targets(targets, path, {"config_digest": "abc"})
    assert load_soft_targets(path, expect_digest="abc")["train"]["soft_targets"].shape == (64, 2)
    with pytest.raises(ValueError, match="not abc2"):
        load_soft_targets(path, expect_digest="abc2")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_soft_targets(path)
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match="readable"):
        load_soft_targets(path)

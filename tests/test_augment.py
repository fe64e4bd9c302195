"""Robust distillation's transfer-set augmentation: renamed copies of real Devign functions."""

import numpy as np
import pytest

from moekd_ray.identifiers import Identifiers, error_count, identifier_vocabulary
from moekd_ray.augment import renamed_variants, with_renamed_copies


@pytest.fixture(scope="module")
def funcs():
    from moekd_ray.config import DataConfig
    from moekd_ray.data import load_devign

    data = load_devign(DataConfig(train_rows=200, eval_rows=30), seed=0)
    return list(data["test"]["func"]), identifier_vocabulary(list(data["train"]["func"]))


def test_copies_rename_every_identifier_consistently(funcs):
    test, pool = funcs
    variants, source = renamed_variants(test, pool, ratio=1.0, seed=0)
    assert len(variants) == len(source) >= 25  # all but functions without a renamable identifier
    for code, i in zip(variants, source):
        before, after = Identifiers(test[i]), Identifiers(code)
        assert len(after.names) == len(before.names) and not set(after.names) & set(before.names)
        assert error_count(code) <= error_count(test[i])  # still parses as well as the original
        # Consistent renaming: each old name's occurrence count is carried by exactly one new name.
        assert sorted(before.occurrences(n) for n in before.names) == sorted(after.occurrences(n) for n in after.names)


def test_ratio_and_seed(funcs):
    test, pool = funcs
    half, _ = renamed_variants(test, pool, ratio=0.5, seed=0)
    two, source = renamed_variants(test, pool, ratio=2.0, seed=0)
    assert 5 <= len(half) <= 25 and len(two) >= 2 * 25 and np.all(np.bincount(source) <= 2)
    assert renamed_variants(test, pool, 1.0, seed=3)[0] == renamed_variants(test, pool, 1.0, seed=3)[0]
    assert renamed_variants(test, pool, 1.0, seed=3)[0] != renamed_variants(test, pool, 1.0, seed=4)[0]


def test_copies_carry_their_originals_targets(funcs):
    from moekd_ray.tokenization import encode, train_bpe

    test, pool = funcs
    tok = train_bpe(test, 400, 64)
    enc = encode(tok, test, 64)
    labels = np.arange(len(test)) % 2
    teacher = np.random.default_rng(0).dirichlet([1, 1], size=len(test)).astype(np.float32)
    enc2, labels2, teacher2, n = with_renamed_copies(enc, labels, teacher, test, tok, 64, pool, 1.0, seed=0)
    _, source = renamed_variants(test, pool, 1.0, seed=0)
    assert n == len(source) and enc2["input_ids"].shape == (len(test) + n, 64)
    np.testing.assert_array_equal(enc2["input_ids"][: len(test)], enc["input_ids"])  # originals untouched, first
    np.testing.assert_array_equal(labels2[len(test):], labels[source])
    np.testing.assert_array_equal(teacher2[len(test):], teacher[source])
    assert (enc2["input_ids"][len(test):] != enc["input_ids"][source]).any(axis=1).mean() > 0.9  # really renamed


def test_robust_transfer_set_follows_the_distill_config(funcs):
    """The one augmentation step of the pipeline and the benchmark: nothing without augment_ratio, random copies
    without calling the attack, attack-found ones through `find_adversarial` (its renamings become copies)."""
    from moekd_ray.config import DistillConfig
    from moekd_ray.augment import robust_transfer_set
    from moekd_ray.tokenization import encode, train_bpe

    test, pool = funcs
    tok = train_bpe(test, 400, 64)
    enc, labels = encode(tok, test, 64), np.arange(len(test)) % 2
    teacher = np.random.default_rng(0).dirichlet([1, 1], size=len(test)).astype(np.float32)
    lines, calls = [], []

    def attack():
        calls.append(1)
        return {0: test[0].replace("(", " (", 1)}

    def augment(**distill):
        return robust_transfer_set(DistillConfig(**distill), enc, labels, teacher, test, tok, 64, pool, 0, attack,
                                   lines.append)

    same = augment()
    assert same[0] is enc and same[3] == {} and not calls and not lines
    random = augment(augment_ratio=1.0)
    expected = with_renamed_copies(enc, labels, teacher, test, tok, 64, pool, 1.0, seed=0)
    np.testing.assert_array_equal(random[0]["input_ids"], expected[0]["input_ids"])
    assert random[3] == {"renamed_copies": expected[3], "attack_found_copies": 0} and not calls
    found = augment(augment_ratio=1.0, augment_attack="wir-random")
    assert calls == [1] and found[3]["attack_found_copies"] == 1
    assert "identifier-renamed copies (1 attack-found) join the" in lines[-1]


def test_adversarial_copies_are_attack_found_renamings(funcs, tmp_path, one_thread):
    """distill.augment_attack: each chosen function's first copy is the renaming WIR-Random found against the plain
    mean of two (tiny, untrained) experts; it lowers their probability of the soft targets' class."""
    from moekd_ray.attacks.victim import load_victim
    from moekd_ray.augment import adversarial_renamings
    from moekd_ray.config import ArchConfig, load_config
    from moekd_ray.models import build_model
    from moekd_ray.tokenization import train_bpe

    test, pool = funcs
    arch = ArchConfig(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, ffn_size=64, max_length=64)
    tok = train_bpe(test, arch.vocab_size, arch.max_length)
    for k in range(2):  # the benchmark teachers' layout: expert_<k>/ with its tokenizer/
        build_model(arch, seed=k).save_pretrained(str(tmp_path / f"expert_{k}"))
        tok.save_pretrained(str(tmp_path / f"expert_{k}" / "tokenizer"))
    victim = load_victim(tmp_path, "uniform")
    p = victim(test)
    teacher = np.stack([1 - p, p], axis=1)  # soft targets that agree with the victim: every function is attacked
    cfg = load_config(None, ["distill.augment_ratio=0.5", "distill.augment_attack=wir-random",
                             "distill.augment_budget=12", "attack.workers=1"])

    adversarial = adversarial_renamings(cfg, tmp_path, "uniform", test, teacher, pool, log=lambda *_: None)
    assert adversarial == adversarial_renamings(cfg, tmp_path, "uniform", test, teacher, pool, log=lambda *_: None)
    assert 3 <= len(adversarial) <= 25  # about half the functions were chosen; most get a renaming
    for i, code in adversarial.items():
        before, after = Identifiers(test[i]), Identifiers(code)
        assert code != test[i] and error_count(code) <= error_count(test[i])
        assert sorted(before.occurrences(n) for n in before.names) == sorted(after.occurrences(n) for n in after.names)
        label = int(teacher[i].argmax())
        p_true = lambda q: q if label == 1 else 1 - q  # noqa: E731
        assert p_true(victim([code])[0]) < p_true(p[i])  # the greedy attack keeps only renamings that hurt

    variants, source = renamed_variants(test, pool, 0.5, cfg.seed, adversarial)
    random_only, _ = renamed_variants(test, pool, 0.5, cfg.seed)
    assert len(variants) == len(random_only)  # same functions, same number of copies
    assert {i: v for v, i in zip(variants, source) if i in adversarial} == adversarial

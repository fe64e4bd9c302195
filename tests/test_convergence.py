"""The pieces that make training converge and models usable, without Ray: the learning-rate schedule, best-epoch
keeping and early stopping, the validation-chosen decision threshold moved into a model's weights, the degenerate
guard, the n-gram bag family and its hasher, and the tfidf-lr reference."""

import numpy as np
import pytest
import torch

from moekd_ray.baseline import TfidfLR
from moekd_ray.config import ArchConfig, GraphConfig, NgramConfig, Schedule
from moekd_ray.metrics import choose_threshold, classification_metrics, degenerate, roc_auc, validation_metrics
from moekd_ray.models import build_model, load_model, shift_decision
from moekd_ray.tokenization import NgramHasher, encode, load_tokenizer
from moekd_ray.train_loop import BestEpoch, lr_at, make_loader, predict_logits, probs1, scheduled, torch_step

ARCH = ArchConfig(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, ffn_size=32, max_length=32)
NGRAM = NgramConfig(buckets=512, dim=8, max_length=64)
GRAPH = GraphConfig(buckets=512, dim=8, rounds=2, max_length=16)


def test_lr_warms_up_then_decays_to_zero():
    total, peak = 100, 1e-3
    linear = [lr_at(s, total, peak, 0.1, "linear") for s in range(total)]
    assert linear[0] == pytest.approx(peak / 10) and linear[9] == pytest.approx(peak)  # 10 warm-up steps
    assert all(a >= b for a, b in zip(linear[9:], linear[10:]))  # then never rises
    assert linear[-1] == pytest.approx(peak / 90, rel=1e-6)  # one step before 0
    cosine = [lr_at(s, total, peak, 0.1, "cosine") for s in range(total)]
    assert cosine[10] == pytest.approx(peak) and cosine[55] == pytest.approx(peak / 2, rel=0.05)
    assert [lr_at(s, total, peak, 0.0, "none") for s in (0, 50, 99)] == [peak] * 3


def test_scheduled_step_sets_the_rate_from_the_global_step():
    """A run resumed after `done` steps follows the same curve as one that never stopped."""
    sched = Schedule(epochs=1, lr=0.1, warmup_ratio=0.2, decay="linear")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []
    step = scheduled(lambda loss: seen.append(opt.param_groups[0]["lr"]), opt.param_groups, sched, total=10, done=3)
    for _ in range(3):
        step(torch.zeros(()))
    assert seen == pytest.approx([lr_at(s, 10, 0.1, 0.2, "linear") for s in (3, 4, 5)])


def test_gradient_clipping_bounds_the_update():
    model = torch.nn.Linear(4, 1, bias=False)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    torch_step(opt, grad_clip=0.5)(model(torch.full((1, 4), 100.0)).sum())
    assert float((model.weight.detach() - before).norm()) == pytest.approx(0.5, rel=1e-4)


def test_best_epoch_by_metric_and_patience():
    rows = [{"epoch": 1, "val_auc": 0.6, "val_loss": 0.70}, {"epoch": 2, "val_auc": 0.7, "val_loss": 0.69},
            {"epoch": 3, "val_auc": 0.65, "val_loss": 0.68}, {"epoch": 4, "val_auc": 0.66, "val_loss": 0.71}]
    by_auc = BestEpoch("auc", patience=2)
    assert [by_auc.update(r["epoch"], r) for r in rows] == [True, True, False, False]
    assert by_auc.epoch == 2 and not by_auc.stop(3) and by_auc.stop(4)
    by_loss = BestEpoch("loss", patience=None, history=rows)  # replayed, as after a restart
    assert by_loss.epoch == 3 and not by_loss.stop(10)
    last = BestEpoch("last", None, rows)
    assert last.epoch == 4


def test_threshold_choice_and_mcc_avoids_one_class():
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.4).astype(int)
    probs = np.clip(0.3 + 0.15 * labels + rng.normal(0, 0.1, 400), 0, 1)  # informative but centred below 0.5
    t_acc = choose_threshold(labels, probs, "accuracy")
    assert classification_metrics(labels, probs, t_acc)["accuracy"] >= classification_metrics(labels, probs)["accuracy"]
    assert classification_metrics(labels, probs, t_acc)["accuracy"] > 0.75
    t_mcc = choose_threshold(labels, probs, "mcc")
    pred = probs >= t_mcc
    assert 0.1 < pred.mean() < 0.9  # both classes predicted
    # A useless score: MCC cannot beat 0 anywhere, so the cut stays at the one closest to 0.5.
    assert choose_threshold(labels, np.full(400, 0.3), "mcc") == 0.5


def test_balanced_accuracy_cut_does_not_follow_the_class_balance():
    """Scores of the same quality on splits with 20% and 80% vulnerable: the accuracy cut moves with the balance
    (towards the rarer class being called less), the balanced-accuracy cut stays near the classes' midpoint."""
    rng = np.random.default_rng(1)
    cuts = {}
    for share in (0.2, 0.8):
        labels = (rng.random(4000) < share).astype(int)
        probs = np.clip(0.4 + 0.2 * labels + rng.normal(0, 0.1, 4000), 0, 1)
        cuts[share] = {m: choose_threshold(labels, probs, m) for m in ("accuracy", "balanced_accuracy")}
        metrics = classification_metrics(labels, probs, 0.5)
        assert metrics["balanced_accuracy"] == pytest.approx((metrics["recall"] + np.mean(probs[labels == 0] < 0.5)) / 2)
    assert cuts[0.2]["accuracy"] - cuts[0.8]["accuracy"] > 0.1, cuts
    assert abs(cuts[0.2]["balanced_accuracy"] - 0.5) < 0.03 and abs(cuts[0.8]["balanced_accuracy"] - 0.5) < 0.03, cuts


def test_degenerate_guard():
    labels = np.array([0, 1] * 50)
    assert "100.0%" in degenerate(labels, np.zeros(100), 0.95, 0.0)
    assert "F1" in degenerate(labels, np.where(np.arange(100) < 50, 0.9, 0.1), 0.95, 0.9)
    assert degenerate(labels, labels * 0.8 + 0.1, 0.95, 0.2) is None


def test_validation_metrics_auc_and_loss():
    labels = np.array([0, 0, 1, 1])
    logits = np.array([[2.0, 0.0], [0.0, 0.5], [0.0, 1.0], [0.0, 3.0]])
    m = validation_metrics(labels, logits)
    assert m["auc"] == 1.0 and roc_auc(labels, np.array([0.9, 0.1, 0.2, 0.8])) == 0.5
    p = torch.softmax(torch.tensor(logits), -1).numpy()
    assert m["loss"] == pytest.approx(-np.mean(np.log(p[np.arange(4), labels])))


@pytest.mark.parametrize("spec", [ARCH, NGRAM, GRAPH], ids=["encoder", "ngram", "graph"])
def test_shift_decision_moves_the_threshold_into_the_weights(spec):
    model = build_model(spec, seed=0).eval()
    ids = torch.randint(5, 200, (64, 16))
    if spec is GRAPH:  # (label, parent, previous use) per node: 16 unlinked nodes
        ids = torch.stack([ids, torch.zeros_like(ids), torch.zeros_like(ids)], -1).reshape(64, 48)
    with torch.no_grad():
        before = torch.softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, -1)[:, 1].numpy()
    threshold = float(np.median(before))
    shift_decision(model, threshold)
    with torch.no_grad():
        after = torch.softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, -1)[:, 1].numpy()
    clear = np.abs(before - threshold) > 1e-6  # away from the cut itself (float rounding)
    assert clear.sum() >= 60
    assert np.array_equal((before >= threshold)[clear], (after >= 0.5)[clear])
    assert not np.allclose(before, after)


def test_ngram_hasher_and_bag_round_trip(tmp_path):
    hasher = NgramHasher(buckets=512, ngram=2, max_length=64)
    funcs = ["int f(char *s) { char b[8]; strcpy(b, s); }", "int g(int x) { return x + 1; }"]
    enc = encode(hasher, funcs, 64)
    assert enc["input_ids"].shape == (2, 64) and enc["input_ids"].max() <= 512
    assert (enc["input_ids"] > 0).sum() == enc["attention_mask"].sum()  # 0 only where padding
    assert np.array_equal(encode(hasher, funcs, 64)["input_ids"], enc["input_ids"])  # crc32: no per-process salt
    hasher.save_pretrained(tmp_path / "tok")
    assert np.array_equal(encode(load_tokenizer(tmp_path / "tok"), funcs, 64)["input_ids"], enc["input_ids"])

    model = build_model(NGRAM, seed=1)
    model.save_pretrained(tmp_path / "bag")
    loaded = load_model(tmp_path / "bag")
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    assert np.allclose(predict_logits(loaded, enc, 8), predict_logits(model.eval(), enc, 8))


def test_ngram_bag_learns_a_token_rule(one_thread):
    """The family's own training loop (the one expert workers run) separates functions by one token."""
    rng = np.random.default_rng(0)
    funcs = [f"int f{i}(char *s) {{ char b[8]; {'strcpy(b, s)' if i % 2 else 'strncpy(b, s, 7)'}; "
             f"return {rng.integers(9)}; }}" for i in range(200)]
    labels = np.arange(200) % 2
    hasher = NgramHasher(buckets=512, ngram=2, max_length=64)
    arrays = {**encode(hasher, funcs, 64), "labels": labels}
    model = build_model(NGRAM, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    from moekd_ray.train_loop import train_epoch, weighted_ce

    for _ in range(5):
        train_epoch(model, make_loader(arrays, 16, shuffle=True), weighted_ce, torch_step(opt, 1.0))
    assert classification_metrics(labels, probs1(predict_logits(model, arrays, 64)))["accuracy"] == 1.0


def test_tfidf_lr_reference_fits_a_token_rule():
    funcs = [f"void f(char *s) {{ char b[4]; {'gets(b)' if i % 2 else 'fgets(b, 4, stdin)'}; x{i % 7}++; }}"
             for i in range(120)]
    labels = np.arange(120) % 2
    ref = TfidfLR().fit(funcs[:80], labels[:80], funcs[80:100], labels[80:100])
    assert ((ref.predict_proba(funcs[100:]) >= 0.5) == labels[100:]).mean() == 1.0
    assert ref.num_params > 0 and ref.c in (0.1, 0.3, 1.0, 3.0)


def test_saved_tfidf_lr_scores_as_fitted_and_can_be_attacked(tmp_path):
    """Saved without pickle and loaded as a scorer (the benchmark attacks it): the same probabilities, and ALERT
    finds substitutes for it by spelling (it has no embedding table)."""
    from moekd_ray.attacks.victim import load_victim

    funcs = [f"int f{i}(int *buf, int len) {{ {'memcpy(buf, src, len)' if i % 2 else 'strncpy(buf, src, 4)'}; "
             f"return len + {i}; }}" for i in range(120)]
    labels = np.arange(120) % 2
    ref = TfidfLR().fit(funcs[:80], labels[:80], funcs[80:100], labels[80:100])
    ref.save(tmp_path)
    assert not any(p.suffix in (".pkl", ".pickle", ".joblib") for p in tmp_path.iterdir())
    victim = load_victim(tmp_path)
    np.testing.assert_allclose(victim(funcs[100:]), ref.predict_proba(funcs[100:]), rtol=0, atol=1e-12)
    vectors = victim.embed_names(["length", "len", "buffer"])
    cosine = vectors @ vectors.T / np.outer(np.linalg.norm(vectors, axis=1), np.linalg.norm(vectors, axis=1))
    assert cosine[0, 1] > cosine[0, 2]  # "length" is spelled closer to "len" than to "buffer"

"""The structural attack family and the identifier-canonicalisation defence, on hand-written C with known answers
and on synthetic functions (tests/synthetic.py): every edit keeps the function parseable with the same identifiers
and calls and changes its text; canonicalisation makes any renaming the attacks can make invisible."""

import random

import numpy as np
import pytest

import synthetic
from moekd_ray.identifiers import Identifiers, canonicalize, error_count
from moekd_ray.attacks.methods import ATTACKS, structural
from moekd_ray.attacks.structural import TRANSFORMS, Structure, names_and_calls, random_edits
from moekd_ray.attacks.victim import BudgetedVictim
from moekd_ray.config import ATTACK_NAMES

CODE = """static int copy_items(struct ctx *c, const char *src, int n)
{
    int i, total;
    char buf[64];
    int a;
    int b;
    total = 0;
    a = 1;
    b = 2;
    for (i = 0; i < n; i++) {
        total += src[i];
    }
    while (total > 100)
        total -= 3;
    if (n > 4)
        memcpy(buf, src, 4);
    else {
        buf[0] = 0;
    }
    log_value(c, ((total)));
    return total + a + b;
}
"""


def test_every_transform_is_found_and_keeps_parse_names_and_calls():
    structure = Structure(CODE)
    kinds = {e.kind for e in structure.edits}
    assert kinds == set(TRANSFORMS), f"missing: {set(TRANSFORMS) - kinds}"
    before = names_and_calls(CODE)
    for edit in structure.edits:
        new = structure.apply(edit)
        assert new != CODE, edit
        assert error_count(new) == 0, (edit, new)
        assert names_and_calls(new) == before, (edit, new)


@pytest.mark.parametrize("kind, expect", [
    ("for_to_while", "{ i = 0; while (i < n) {"),
    ("while_to_for", "for (; total > 100; )"),
    ("split_decl", "int i; int total;"),
    ("merge_decl", "int a, b;"),
    ("dead_code", "total = 0; if (0) { total = 0; }"),
])
def test_transform_text(kind, expect):
    structure = Structure(CODE)
    outs = [structure.apply(e) for e in structure.edits if e.kind == kind]
    assert any(expect in out for out in outs), outs


def test_unsafe_edits_are_not_proposed():
    code = "int f(int n) {\n  int s = 0;\n  for (int i = 0; i < n; i++) { if (i & 1) continue; s += i; }\n" \
           "  x = g(); y = x;\n  if (n) { if (s) s = 1; } else s = 2;\n  return s;\n}\n"
    outs = [(e.kind, Structure(code).apply(e)) for e in Structure(code).edits]
    assert not [o for k, o in outs if k == "for_to_while"]  # the body has `continue`
    assert not [o for k, o in outs if k == "swap"]  # x = g() calls; y = x reads x
    assert not any("if (s) s = 1; else" in o for _, o in outs)  # removing those braces would move the else


def test_macro_heavy_code_gets_no_edit_inside_errors():
    code = "static void f(Q *q)\n{\n    QTAILQ_FOREACH(x, &q->list, next) {\n        x->n = 0;\n    }\n    q->n = 1;\n}\n"
    structure = Structure(code)
    for edit in structure.edits:
        new = structure.apply(edit)
        assert error_count(new) <= error_count(code)


def test_random_edits_on_synthetic_functions():
    rng = np.random.default_rng(0)
    changed = 0
    for row in synthetic.rows(60, seed=3):
        new, kinds = random_edits(row["func"], 3, rng)
        assert error_count(new) <= error_count(row["func"])
        assert names_and_calls(new) == names_and_calls(row["func"])
        changed += new != row["func"]
    assert changed == 60  # every synthetic function admits an edit


def test_structural_attack_finds_the_edit_a_known_victim_fears():
    """A victim that believes code with a `while` is safe: the attack must find while_to_for's inverse, for_to_while,
    within the budget, and report what it did."""
    def p_vulnerable(funcs):
        return np.asarray([0.2 if "while" in f else 0.9 for f in funcs])

    victim = BudgetedVictim(p_vulnerable, label=1, budget=64)
    out = structural(victim, Identifiers(CODE.replace("while (total > 100)", "if (total > 100)")), 0.9, [],
                     np.random.default_rng(0), candidates=8)
    assert out.success and "while" in out.code and victim.queries <= 64
    assert any(e.startswith("for_to_while") for e in out.edits)


def test_structural_attack_respects_the_budget_when_nothing_works():
    victim = BudgetedVictim(lambda funcs: np.full(len(funcs), 0.9), label=1, budget=25)
    out = structural(victim, Identifiers(CODE), 0.9, [], np.random.default_rng(0), candidates=8)
    assert not out.success and victim.queries == 25


def test_attack_names_agree():
    """The attacks there are (attacks/methods.py) are the names the config, Tune's robust objective and `moekd attack
    --attack` accept (config.ATTACK_NAMES, from which the CLI takes its choices)."""
    from moekd_ray.cli import build_parser

    assert set(ATTACKS) == set(ATTACK_NAMES)
    attack = build_parser()._subparsers._group_actions[0].choices["attack"]
    assert set(next(a for a in attack._actions if a.dest == "attack").choices) == set(ATTACKS)


# ---------------------------------------------------------------------------------------- canonicalisation
def test_canonical_form_is_invariant_to_every_renaming_the_attacks_make():
    rng = random.Random(0)
    for row in synthetic.rows(80, seed=5):
        ids = Identifiers(row["func"])
        pool = [f"w{j}_{rng.randrange(10**6)}" for j in range(len(ids.names))]
        renamed = ids.rename(dict(zip(ids.names, pool)))
        assert renamed != row["func"]
        assert canonicalize(renamed) == canonicalize(row["func"])


def test_canonical_form_renames_locals_not_fields_calls_or_strings():
    code = 'int f(int len, char *s) { int v0 = len; s->len = v0; printf("len"); return g(len); }'
    out = canonicalize(code)
    # v0 is a local, so it is renamed too; the placeholders are assigned in order of first occurrence.
    assert out == 'int f(int v0, char *v1) { int v2 = v0; v1->len = v2; printf("len"); return g(v0); }'
    assert canonicalize(out) == out


def test_placeholders_avoid_words_the_function_cannot_rename():
    code = "int f(int a) { return a + v0; }"  # v0 is a global here
    assert canonicalize(code) == "int f(int v1) { return v1 + v0; }"


def test_a_canonical_model_scores_a_renamed_function_exactly_as_its_original(tmp_path):
    """Saved and loaded as every scoring path loads it (tokenizer folder + model folder), a student whose tokenizer
    canonicalises gives a renamed function the very number of its original; one that does not, another number."""
    from moekd_ray.config import ArchConfig
    from moekd_ray.models import build_model, load_model
    from moekd_ray.scoring import Scorer
    from moekd_ray.tokenization import CanonicalInput, load_tokenizer, train_bpe

    funcs = [r["func"] for r in synthetic.rows(60, seed=7)]
    arch = ArchConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, ffn_size=64, max_length=64)
    model = build_model(arch, seed=0)
    model.save_pretrained(tmp_path / "model")
    scores = {}
    for canonical in (False, True):
        folder = tmp_path / f"tok-{canonical}"
        train_bpe(funcs, 300, 64, canonical).save_pretrained(folder)
        tok = load_tokenizer(folder)
        assert isinstance(tok, CanonicalInput) == canonical
        scorer = Scorer(load_model(tmp_path / "model"), tok)
        renamed = []
        for f in funcs[:20]:
            ids = Identifiers(f)
            renamed.append(ids.rename({n: f"q{i}x" for i, n in enumerate(ids.names)}))
        scores[canonical] = (scorer(funcs[:20]), scorer(renamed))
    assert np.array_equal(*scores[True])
    assert not np.array_equal(*scores[False])  # (an untrained model: different, though close)


def test_a_canonical_ngram_tokenizer_survives_save_and_load(tmp_path):
    from moekd_ray.tokenization import NgramHasher, load_tokenizer, with_input_transform

    tok = with_input_transform(NgramHasher(1024, 2, 128), True)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    f = synthetic.rows(1, seed=1)[0]["func"]
    ids = Identifiers(f)
    g = ids.rename({n: f"q{i}x" for i, n in enumerate(ids.names)})
    assert loaded([f])["input_ids"] == loaded([g])["input_ids"] != NgramHasher(1024, 2, 128)([g])["input_ids"]


def test_an_unknown_input_transform_is_one_clear_line(tmp_path):
    from moekd_ray.config import load_config
    from moekd_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="data.input_transform"):
        load_config(None, ["data.input_transform=lowercase"])
    with pytest.raises(ConfigError, match="attack.method"):
        load_config(None, ["attack.method=structual"])


# ------------------------------------------------------------------------------------ consistency distillation
def test_consistency_loss_pulls_only_the_copy_towards_the_original():
    import torch

    from moekd_ray.losses import consistency_loss

    original = torch.tensor([[2.0, -1.0], [0.0, 1.0]], requires_grad=True)
    copy = torch.tensor([[-1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    loss = consistency_loss(copy, original, temperature=2.0)
    loss.backward()
    assert loss.item() > 0
    assert original.grad is None or not original.grad.any()  # the original's side is a fixed target
    assert copy.grad[0, 0] < 0 < copy.grad[0, 1]  # descent raises the copy's class-0 logit, as the original's
    assert consistency_loss(original.detach(), original.detach(), 2.0).item() == pytest.approx(0.0, abs=1e-7)
    assert consistency_loss(copy[:0], original[:0], 2.0).item() == 0.0


def test_copies_carry_their_original_for_the_consistency_term():
    from moekd_ray.augment import with_renamed_copies
    from moekd_ray.tokenization import NgramHasher, encode

    funcs = [r["func"] for r in synthetic.rows(12, seed=2)]
    tok = NgramHasher(4096, 2, 64)
    enc, labels, teacher = encode(tok, funcs, 64), np.arange(12) % 2, np.random.default_rng(0).random((12, 2))
    out, out_labels, out_teacher, n = with_renamed_copies(enc, labels, teacher, funcs, tok, 64, [], 1.0, 0,
                                                          edits=True, pairs=True)
    assert n == 12 and len(out["input_ids"]) == len(out_labels) == len(out["pair_input_ids"]) == 24
    assert not out["has_pair"][:12].any() and out["has_pair"][12:].all()
    assert np.array_equal(out["pair_input_ids"][:12], enc["input_ids"])  # an original is its own pair
    assert np.array_equal(out["pair_input_ids"][12:], enc["input_ids"])  # a copy carries its original...
    assert not np.array_equal(out["input_ids"][12:], enc["input_ids"])  # ...and differs from it
    assert np.array_equal(out_teacher[12:], teacher) and np.array_equal(out_labels[12:], labels)


def test_consistency_without_copies_is_one_clear_line():
    from moekd_ray.config import load_config
    from moekd_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="consistency_weight.*augment_ratio"):
        load_config(None, ["distill.consistency_weight=1"])


def test_canonicalisation_lowers_the_renaming_asr_of_a_model_that_learnt_names(tmp_path):
    """Synthetic functions whose names leak the label (vulnerable ones use *_hot names, safe ones *_cold, besides
    the unbounded/bounded copy that decides it): tfidf-lr learns the names too, and MHM flips some of its correct
    answers by renaming. The same model reading canonical identifiers is as accurate, not constant, and MHM flips
    none of them."""
    from moekd_ray.attacks.workers import attack_examples, summarize
    from moekd_ray.baseline import TfidfLR
    from moekd_ray.config import load_config

    hot, cold = [f"{w}_hot" for w in synthetic.WORDS], [f"{w}_cold" for w in synthetic.WORDS]

    def leaky(rows, seed):
        rng, out = random.Random(seed), []
        for row in rows:
            ids, names = Identifiers(row["func"]), list(hot if row["target"] else cold)
            rng.shuffle(names)
            out.append((ids.rename(dict(zip(ids.names, names))), row["target"]))
        return out

    train, test = leaky(synthetic.rows(300, 0), 0), leaky(synthetic.rows(40, 2), 2)
    funcs, labels = [f for f, _ in train], np.asarray([y for _, y in train])
    cfg = load_config(None, ["attack.method=mhm", "attack.workers=1", "attack.query_budget=60"])
    asr = {}
    for canonical in (False, True):
        model = TfidfLR(0, canonical).fit(funcs[:240], labels[:240], funcs[240:], labels[240:])
        model.save(tmp_path / str(canonical))
        called = model.predict_proba([f for f, _ in test]) >= 0.5
        assert 0.3 < called.mean() < 0.7 and (called == np.asarray([y for _, y in test])).mean() >= 0.9
        rows = attack_examples(tmp_path / str(canonical), "student", cfg, [(i, f, y) for i, (f, y) in enumerate(test)],
                               hot + cold, log=lambda *_: None)
        asr[canonical] = summarize(rows, 1.0)["asr"]
    assert asr[False] >= 0.1 and asr[True] == 0.0


# ------------------------------------------------------------------------------------------------ cross-project
def test_cross_project_split_keeps_each_side_to_its_projects(tmp_path):
    from moekd_ray.config import load_config
    from moekd_ray.data import load_devign
    from moekd_ray.errors import DataError

    synthetic.write_devign_like(tmp_path, n_train=120, n_eval=60)
    cfg = load_config(None, [f"data.dir={tmp_path}", "data.train_projects=[FFmpeg]", "data.test_projects=[qemu]"])
    data = load_devign(cfg.data, 0)
    assert set(data["train"]["project"]) == set(data["valid"]["project"]) == {"FFmpeg"}
    assert set(data["test"]["project"]) == {"qemu"} and len(data["test"]) < 60
    wrong = load_config(None, [f"data.dir={tmp_path}", "data.test_projects=[QEMU]"])
    with pytest.raises(DataError, match=r"data.test_projects=\['QEMU'\].*\['FFmpeg', 'qemu'\]"):
        load_devign(wrong.data, 0)


# ------------------------------------------------------------------------------------- the syntax-bag expert
def test_syntax_units_ignore_renaming_and_follow_the_code_s_shape():
    from moekd_ray.tokenization import NgramHasher, syntax_units

    code = synthetic.rows(1, seed=4)[0]["func"]
    ids = Identifiers(code)
    renamed = ids.rename({n: f"q{i}x" for i, n in enumerate(ids.names)})
    assert syntax_units(renamed, 3) == syntax_units(code, 3)
    assert not any(n in u for u in syntax_units(code, 3) for n in ids.names if len(n) > 3)  # no variable's name
    copies = {"call:" + c for c in ("strcpy", "sprintf", "strcat", "strncpy", "snprintf", "strncat")}
    assert copies & set(syntax_units(code, 3))  # the copy that decides the label
    structure = Structure(code)
    edit = next(e for e in structure.edits if e.kind == "dead_code")
    assert syntax_units(structure.apply(edit), 3) != syntax_units(code, 3)
    hasher = NgramHasher(4096, 3, 256, "syntax")
    assert hasher([code])["input_ids"] == hasher([renamed])["input_ids"]


# ------------------------------------------------------------------------------------- the syntax-graph expert
def test_syntax_graph_ignores_renaming_and_links_each_variable_s_uses():
    from moekd_ray.tokenization import SyntaxGraphEncoder, syntax_graph

    code = "int f(int n) { int s = 0; while (n > 0) { s += n; n--; } return s; }"
    graph = syntax_graph(code, 1000)
    labels = [label for label, _, _ in graph]
    assert "while_statement" in labels and "tok:while" in labels and ";" not in " ".join(labels)
    uses = [i for i, (label, _, _) in enumerate(graph) if label == "var"]
    # f n s | n s n n s: each use after a name's first links back to that name's use before it
    assert [graph[i][2] for i in uses] == [-1, -1, -1, uses[1], uses[2], uses[3], uses[5], uses[4]]
    assert all(graph[i][1] >= 0 for i in range(1, len(graph))) and graph[0][1] == -1  # one tree
    renamed = "int f(int count) { int total = 0; while (count > 0) { total += count; count--; } return total; }"
    encoder = SyntaxGraphEncoder(4096, 64)
    assert encoder([renamed], max_length=64, padding="max_length") == encoder([code], max_length=64,
                                                                             padding="max_length")
    row = encoder([code], max_length=8, padding="max_length")
    assert len(row["input_ids"][0]) == 24 and sum(row["attention_mask"][0]) == 24  # cut at 8 nodes, 3 ids each


@pytest.mark.parametrize("family", ["syntax bag", "syntax graph"])
def test_structural_family_learns_the_synthetic_rule_and_round_trips(family, tmp_path, one_thread):
    """Through the experts' training loop, saved and loaded as a run saves it; a function scores the same alone as
    in a batch (the attacks' and the pyfunc's scorer pads every function to the model's length)."""
    import torch

    from moekd_ray.attacks.victim import Classifier
    from moekd_ray.config import GraphConfig, NgramConfig
    from moekd_ray.metrics import classification_metrics
    from moekd_ray.models import build_model, load_model
    from moekd_ray.tokenization import NgramHasher, SyntaxGraphEncoder, encode, load_tokenizer
    from moekd_ray.train_loop import make_loader, predict_logits, probs1, torch_step, train_epoch, weighted_ce

    if family == "syntax bag":
        spec, lr = NgramConfig(units="syntax", ngram=3, buckets=4096, dim=16, max_length=512), 0.05
        tokenizer = NgramHasher(spec.buckets, spec.ngram, spec.max_length, spec.units)
    else:
        spec, lr = GraphConfig(buckets=4096, dim=16, rounds=3, max_length=256), 0.01
        tokenizer = SyntaxGraphEncoder(spec.buckets, spec.max_length)
    rows = synthetic.rows(240, seed=9)
    funcs = [r["func"] for r in rows]
    arrays = {**encode(tokenizer, funcs, spec.max_length), "labels": np.asarray([r["target"] for r in rows])}
    train = {k: v[:180] for k, v in arrays.items()}
    held = {k: v[180:] for k, v in arrays.items()}
    model = build_model(spec, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(8):
        train_epoch(model, make_loader(train, 16, shuffle=True), weighted_ce, torch_step(opt, 1.0))
    p = probs1(predict_logits(model.eval(), held, 64))
    assert classification_metrics(held["labels"], p)["accuracy"] >= 0.9
    model.save_pretrained(tmp_path / "expert")
    tokenizer.save_pretrained(tmp_path / "expert" / "tokenizer")
    loaded, reloaded = load_model(tmp_path / "expert"), load_tokenizer(tmp_path / "expert" / "tokenizer")
    assert type(reloaded) is type(tokenizer) and type(loaded) is type(model)
    assert np.array_equal(encode(reloaded, funcs[180:], spec.max_length)["input_ids"], held["input_ids"])
    assert np.allclose(probs1(predict_logits(loaded, held, 64)), p, atol=1e-6)
    scorer = Classifier(loaded, reloaded)
    assert np.allclose(scorer(funcs[180:181]), scorer(funcs[180:190])[:1], atol=1e-6)
    assert np.allclose(scorer(funcs[180:190]), p[:10], atol=1e-5)
    assert scorer.embed_names(["len", "buf"]).shape == (2, 16)  # ALERT's substitute space


# ------------------------------------------------------------------------------------------ specialisation
def test_specialisation_table_knows_which_expert_is_right_where():
    """Expert 0 right on part 0 only, expert 1 right on part 1 only, a router that sends each part to its expert."""
    from moekd_ray.stages.aggregate import specialisation, specialisation_lines

    labels, parts = np.array([0, 1, 0, 1, 1, 0]), np.array([0, 0, 0, 1, 1, 1])
    right = np.stack([[-1.0, 1.0] if y else [1.0, -1.0] for y in labels])
    logits = np.stack([np.where(parts[:, None] == 0, right, -right), np.where(parts[:, None] == 1, right, -right)], 1)
    weights = np.stack([np.where(parts == 0, 0.9, 0.1), np.where(parts == 0, 0.1, 0.9)], 1)
    spec = specialisation({"labels": labels, "expert_logits": logits, "weights": weights}, parts, 2)
    assert spec["accuracy"] == [[1.0, 0.0], [0.0, 1.0]]
    assert spec["weight"] == [[pytest.approx(0.9), pytest.approx(0.1)], [pytest.approx(0.1), pytest.approx(0.9)]]
    assert spec["routing_entropy"] < spec["max_entropy"] and spec["rows"] == [3, 3]
    assert spec["own_best"] == 2 and spec["own_edge"] == [1.0, 1.0]
    assert any(line.startswith("experts best on their own part: 2 of 2 parts") and "+100.0, +100.0" in line
               for line in specialisation_lines(spec))
    assert any("routing entropy" in line for line in specialisation_lines(spec))
    # swap the experts: each is now the worst on its own part
    swapped = specialisation({"labels": labels, "expert_logits": logits[:, ::-1], "weights": weights}, parts, 2)
    assert swapped["own_best"] == 0 and swapped["own_edge"] == [-1.0, -1.0]


@pytest.mark.parametrize("strategy", ["kmeans", "syntax", "project", "length", "random"])
def test_a_partition_assigns_other_splits_as_it_split_training(strategy):
    from moekd_ray.partition import assign_parts, partition

    rows = synthetic.rows(80, seed=11)
    funcs, projects = [r["func"] for r in rows], [r["project"] for r in rows]
    parts = partition(funcs, projects, strategy, 2, 0, 256)
    again = assign_parts(strategy, funcs, projects, parts, funcs, projects, 2, 0, 256)
    agree = (again == parts).mean()
    assert agree >= (0.4 if strategy == "random" else 0.9), agree  # the training rows fall where they were put


def test_the_registered_pyfunc_applies_the_input_transform(tmp_path):
    """Loaded through mlflow.pyfunc as a user loads it, a canonical student scores a renamed function exactly as
    its original; the same student without the transform does not."""
    import mlflow
    from servers import registered_tiny_student

    code = "int f(char *buf, int n) { int k = 3; if (n > k) memcpy(buf, \"x\", n); return k; }"
    ids = Identifiers(code)
    renamed = ids.rename({n: f"zq{i}" for i, n in enumerate(ids.names)})
    for canonical in (True, False):
        with registered_tiny_student(tmp_path / str(canonical), f"canon-{canonical}", head_scale=50.0,
                                     canonical=canonical) as (uri, *_):
            p = mlflow.pyfunc.load_model(uri).predict([code, renamed])["probability"].to_numpy()
        assert (p[0] == p[1]) == canonical, p

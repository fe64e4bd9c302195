"""Plain-torch training/inference helpers on a tiny RoBERTa, and the BPE tokenizer on real C functions."""

import gzip
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moekd_ray.config import ArchConfig
from moekd_ray.models import PAD_ID, build_model
from moekd_ray.tokenization import encode, load_tokenizer, train_bpe
from moekd_ray.train_loop import make_loader, predict_logits, torch_step, train_epoch, trim_padding, weighted_ce

from conftest import DEVIGN_DIR

TINY = ArchConfig(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, ffn_size=32, max_length=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_task(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """<s> tokens </s> <pad>...: label 1 rows are made of token 10, label 0 rows of token 20; lengths vary."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    ids = np.full((n, TINY.max_length), PAD_ID, dtype=np.int32)
    mask = np.zeros_like(ids)
    for i, (y, length) in enumerate(zip(labels, rng.integers(4, 12, n))):
        ids[i, :length] = [0] + [10 if y else 20] * (length - 2) + [2]
        mask[i, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int64)}


def test_training_decreases_loss():
    model = build_model(TINY, seed=0)
    step = torch_step(torch.optim.AdamW(model.parameters(), lr=1e-2))
    loader = make_loader(toy_task(64), batch_size=16, shuffle=True, seed=0)
    losses = [train_epoch(model, loader, weighted_ce, step)["train_loss"] for _ in range(6)]
    assert losses[-1] < 0.5 * losses[0]
    assert losses[0] > 0.5  # starts near chance (ln 2)


def test_trim_padding_drops_only_all_padding_columns():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    ids = torch.arange(18).reshape(3, 6)
    labels = torch.tensor([0, 1, 0])
    out = trim_padding({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert torch.equal(out["input_ids"], ids[:, :5])
    assert torch.equal(out["attention_mask"], mask[:, :5])
    assert torch.equal(out["labels"], labels)
    full = trim_padding({"input_ids": ids, "attention_mask": torch.ones(3, 6, dtype=torch.long)})
    assert full["input_ids"].shape == (3, 6)


def test_predict_logits_in_input_order_for_any_batch_size():
    model = build_model(TINY, seed=0)
    arrays = toy_task(11, seed=1)
    reference = predict_logits(model, arrays, batch_size=1)
    assert reference.shape == (11, 2)
    assert not np.allclose(reference, reference[0])  # rows differ, so order is observable
    for bs in (3, 4, 64):
        np.testing.assert_allclose(predict_logits(model, arrays, batch_size=bs), reference, atol=1e-5)
    reversed_rows = {k: v[::-1].copy() for k, v in arrays.items()}
    np.testing.assert_allclose(predict_logits(model, reversed_rows, batch_size=4), reference[::-1], atol=1e-5)


def test_weighted_ce():
    logits = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0, 1])
    plain = F.cross_entropy(logits, labels)
    torch.testing.assert_close(weighted_ce(logits, {"labels": labels}), plain)
    torch.testing.assert_close(weighted_ce(logits, {"labels": labels, "weight": torch.ones(5)}), plain)
    only_first_two = {"labels": labels, "weight": torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])}
    torch.testing.assert_close(weighted_ce(logits, only_first_two), F.cross_entropy(logits[:2], labels[:2]))


# ---------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def c_funcs():
    with gzip.open(DEVIGN_DIR / "test.jsonl.gz", "rt") as fh:
        return [json.loads(line)["func"] for line in itertools.islice(fh, 40)]


@pytest.fixture(scope="module")
def tokenizer(c_funcs):
    return train_bpe(c_funcs, vocab_size=300, max_length=64)


def test_bpe_layout(tokenizer, c_funcs):
    assert len(tokenizer) > 5  # transformers 5 with vocab_file=/merges_file= gives only the specials
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer(c_funcs[0][:200])["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2
    assert len(ids) > 3 and all(i > 4 for i in ids[1:-1])  # real tokens, not <unk>


def test_encode_shapes(tokenizer, c_funcs):
    enc = encode(tokenizer, c_funcs[:5] + ["int x;"], max_length=64)
    for arr in enc.values():
        assert arr.dtype == np.int32 and arr.shape == (6, 64)
    assert enc["attention_mask"][:5].all()  # long functions are truncated to max_length
    assert enc["input_ids"][0, -1] == 2
    short_len = int(enc["attention_mask"][5].sum())
    assert 3 <= short_len < 64
    assert (enc["input_ids"][5, short_len:] == 1).all()


def test_saved_tokenizer_reloads_identically(tokenizer, c_funcs, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    texts = c_funcs[5:10]
    for key, arr in encode(tokenizer, texts, 64).items():
        np.testing.assert_array_equal(encode(reloaded, texts, 64)[key], arr)


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_tokenizer(tmp_path / "absent")

"""Tokenizers: a checkpoint's own, a byte-level BPE trained on the training code, or (for the n-gram bag) a
hasher of C-token n-grams."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import RobertaProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# Identifiers, numbers and the multi-character operators of C; everything else one character at a time.
C_TOKEN = re.compile(r"[A-Za-z_]\w*|\d[\w.]*|->|\+\+|--|<<|>>|[<>=!]=|&&|\|\||[^\s\w]")

# RoBERTa's special tokens, in RoBERTa's id order (pad = 1), so configs built here match CodeBERT's layout.
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_bpe(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (RoBERTa-style: <s> ... </s>) trained on `texts`."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS, show_progress=False)
    bpe.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    # tokenizer_object=: in transformers 5, vocab_file=/merges_file= silently give an empty vocabulary.
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,  # the raw `tokenizers.Tokenizer` inside the convenience wrapper
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=max_length,
    )


class NgramHasher:
    """The n-gram bag's tokenizer: a function's C tokens and their runs of up to `ngram` tokens, each hashed (crc32,
    the same on every machine) to a bucket in 1..buckets (0 is padding). Nothing to train; called like a HF tokenizer."""

    FILE = "ngram_hasher.json"

    def __init__(self, buckets: int, ngram: int, max_length: int):
        self.buckets, self.ngram, self.max_length = buckets, ngram, max_length

    def __len__(self) -> int:
        return self.buckets

    def ids(self, text: str, max_length: int, with_ngrams: bool = True) -> list[int]:
        tokens = C_TOKEN.findall(text)
        grams = list(tokens)
        for n in range(2, self.ngram + 1 if with_ngrams else 1):
            grams += [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        return [zlib.crc32(g.encode()) % self.buckets + 1 for g in grams[:max_length]]

    def __call__(self, texts, truncation: bool = True, max_length: int | None = None, padding=False,
                 add_special_tokens: bool = True, **_):
        """{"input_ids", "attention_mask"} per text; padding="max_length" pads every row to max_length.
        add_special_tokens=False: tokens only (a name's own buckets, as ALERT's substitute search needs)."""
        single = isinstance(texts, str)
        length = max_length or self.max_length
        rows = [self.ids(t, length, add_special_tokens) for t in ([texts] if single else texts)]
        width = length if padding == "max_length" else max((len(r) for r in rows), default=0)
        ids = [r + [0] * (width - len(r)) for r in rows] if padding else rows
        mask = [[1] * len(r) + [0] * (len(i) - len(r)) for r, i in zip(rows, ids)]
        return {"input_ids": ids[0] if single else ids, "attention_mask": mask[0] if single else mask}

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / self.FILE).write_text(json.dumps(
            {"buckets": self.buckets, "ngram": self.ngram, "max_length": self.max_length}))


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast | NgramHasher:
    """A saved tokenizer folder or a hub name; a clear error when it is neither cached nor reachable."""
    hasher = Path(name_or_path) / NgramHasher.FILE
    if hasher.is_file():
        return NgramHasher(**json.loads(hasher.read_text()))
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as exc:
        raise ValueError(
            f"tokenizer {name_or_path!r} cannot be loaded ({str(exc).splitlines()[0][:160]}); download it on a "
            "machine with hub access or give a local folder"
        ) from None


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """input_ids/attention_mask padded to `max_length`, as int32 arrays (cheap to ship to Ray workers)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")
    return {k: np.asarray(enc[k], dtype=np.int32) for k in ("input_ids", "attention_mask")}

"""Tokenizers: a checkpoint's own, or a byte-level BPE trained on the training code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import RobertaProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerFast

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


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """A saved tokenizer folder or a hub name; a clear error when it is neither cached nor reachable."""
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

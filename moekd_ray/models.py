"""Experts and students: `transformers` sequence classifiers, from a config or a pretrained checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from moekd_ray.config import ArchConfig, PretrainedConfig

PAD_ID = 1  # RoBERTa layout (see tokenization.SPECIALS)


def build_model(spec: ArchConfig | PretrainedConfig, seed: int):
    """A fresh two-class classifier: random init from `spec`, or the pretrained weights it names (safetensors only:
    a pickled pytorch_model.bin can run code when loaded)."""
    torch.manual_seed(seed)
    if isinstance(spec, PretrainedConfig):
        try:
            return AutoModelForSequenceClassification.from_pretrained(spec.name_or_path, num_labels=2,
                                                                      use_safetensors=True)
        except OSError as exc:
            raise ValueError(
                f"model {spec.name_or_path!r} cannot be loaded ({str(exc).splitlines()[0][:160]}); its weights must "
                "be safetensors: download it on a machine with hub access (or set HF_HOME to a cache holding it) or "
                "give a local folder with model.safetensors"
            ) from None
    config = RobertaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.ffn_size,
        max_position_embeddings=spec.max_length + 2,  # RoBERTa positions start after the padding index
        type_vocab_size=1,
        pad_token_id=PAD_ID,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=2,
    )
    return RobertaForSequenceClassification(config)


def load_model(folder: str | Path):
    """A saved HF classifier (safetensors weights only)."""
    problem = None
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(folder), use_safetensors=True, output_loading_info=True)
        # transformers re-initialises mismatched or missing weights with only a report: a silently random model.
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys", "unexpected_keys") and v}
        if not bad:
            return model
        problem = "; ".join(f"{len(v)} {k.replace('_', ' ')}, e.g. {sorted(map(str, v))[0][:80]}" for k, v in bad.items())
    except (OSError, RuntimeError, ValueError) as exc:
        problem = str(exc).strip().splitlines()[0][:160]
    raise ValueError(f"{folder}: the model cannot be loaded ({problem}); its weights must be safetensors of the "
                     "architecture in its config.json: give a folder a moekd run wrote")


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_mb(model: torch.nn.Module) -> float:
    """Size of the float32 weights in MB (10^6 bytes), as Compressor reports it."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6

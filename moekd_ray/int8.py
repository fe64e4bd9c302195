"""int8 students: weights stored as int8 for deployment (weight-only quantisation).

A saved int8 model is a folder like a float one (config.json, model.safetensors) plus the marker file MARKER.
In model.safetensors every weight matrix (embeddings included, which hold most of a small student's weights) is
int8 with one float32 scale per row (`<name>.int8_scale`, symmetric: w ~ q * scale); vectors (biases, layer norms)
stay float32. About 4x smaller on disk than float32. Loading rebuilds the float model from those weights and runs it
in float32: a function's score depends on that function alone. Dynamic quantisation (torch's int8 linear layers)
quantises activations with one scale per batch, so a score moved with its batch mates, which broke canonical
identifiers' guarantee (a renamed function scores exactly as its original) and gave no speed-up on 2 threads
(0.92x): at the students' sizes the linear layers are a third of the time or less (docs/registry.md).

Self-contained (torch, safetensors, transformers): a logged pyfunc carries a copy of this file, as of scoring.py.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

MARKER = "moekd_int8.json"  # in a model folder: its weights are int8 (this module's format)
SCALE = ".int8_scale"  # suffix of a matrix's per-row scales in model.safetensors


def is_int8(folder) -> bool:
    return os.path.isfile(os.path.join(str(folder), MARKER))


def quantize_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each matrix as int8 plus its per-row scales (round to nearest, |q| <= 127); anything else as float32."""
    stored = {}
    for name, tensor in state.items():
        tensor = tensor.detach().float().contiguous()
        if tensor.dim() != 2:
            stored[name] = tensor
            continue
        scale = tensor.abs().amax(dim=1).clamp(min=1e-12) / 127
        stored[name] = torch.round(tensor / scale[:, None]).clamp(-127, 127).to(torch.int8)
        stored[name + SCALE] = scale
    return stored


def dequantize_weights(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 weights an int8 state stands for (`quantize_weights` undone, up to its rounding)."""
    return {name: tensor.float() * stored[name + SCALE][:, None] if tensor.dtype == torch.int8 else tensor
            for name, tensor in stored.items() if not name.endswith(SCALE)}


def save_int8(model, folder) -> None:
    """A float HF classifier saved in the int8 format: its config, its int8 weights and the marker."""
    os.makedirs(str(folder), exist_ok=True)
    model.config.save_pretrained(str(folder))
    save_file(quantize_weights(model.state_dict()), os.path.join(str(folder), "model.safetensors"),
              metadata={"format": "pt", "moekd": "int8"})
    with open(os.path.join(str(folder), MARKER), "w") as f:
        json.dump({"weights": "int8, one float32 scale per row", "compute": "float32 (weight-only quantisation)"}, f)


def load_int8(folder):
    """An int8 folder as a model ready to score (`int8_model` of its config and weights)."""
    from transformers import AutoConfig

    return int8_model(AutoConfig.from_pretrained(str(folder)), load_file(os.path.join(str(folder), "model.safetensors")))


def int8_model(config, stored: dict[str, torch.Tensor]):
    """The model an int8 state (`quantize_weights`) stands for: its float32 model with the int8 weights dequantised
    (every weight must fit: a mismatch raises), ready to score."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantize_weights(stored), strict=True)
    return model.eval()

"""The one scorer: C source strings in, P(vulnerable) out, for a saved classifier and its tokenizer.

Every path that scores functions goes through `Scorer`: the registered pyfunc (pyfunc_model.py, and so
`moekd predict` and `mlflow models serve`), the attacks' victims (attacks/victim.py, and so tune's robust objective
and the benchmark's attack rows). The decision threshold lives in the weights (models.shift_decision), so
P >= 0.5 is the model's decision everywhere.

Self-contained (numpy and torch only): a logged pyfunc carries a copy of this file, so a served model needs no
moekd-ray install.
"""

from __future__ import annotations

import numpy as np
import torch


TRAINED_LENGTH = "moekd_max_length"  # config.json's key for the tokens per function a model was trained on


def max_input_length(model) -> int:
    """Tokens (n-grams for the n-gram bag, syntax-tree nodes for the graph) a model reads per function: those it was
    trained on (a pretrained checkpoint's positions may hold more: CodeBERT's 512, an expert trained on 400)."""
    spec = getattr(model, "spec", None)  # moekd's own families (models.OwnModel) keep their settings in `spec`
    if spec is not None:
        return int(spec.max_length)
    trained = getattr(model.config, TRAINED_LENGTH, None)
    if trained is not None:
        return int(trained)
    # a model saved before its length was: all its positions (RoBERTa's start after the padding index)
    return int(model.config.max_position_embeddings) - 2


class Scorer:
    """`scorer(funcs)` -> P(vulnerable) per function, `batch_size` functions at a time.

    Every function is padded to the model's maximum length, so its score does not depend on what it is batched
    with (beyond float rounding): the attacked model and the served model give the same number for the same
    function. (tokenization.encode does the same; this file stays self-contained for the logged model.)"""

    def __init__(self, model, tokenizer, max_length: int | None = None, batch_size: int = 64, device: str = "cpu"):
        self.model, self.tokenizer, self.batch_size = model.eval().to(device), tokenizer, batch_size
        self.max_length = max_length or max_input_length(model)
        self.device = device

    @torch.no_grad()
    def __call__(self, funcs: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(funcs), self.batch_size):
            enc = self.tokenizer(list(funcs[i : i + self.batch_size]), truncation=True, max_length=self.max_length,
                                 padding="max_length")
            ids, mask = (torch.as_tensor(np.asarray(enc[k], dtype=np.int64), device=self.device)
                         for k in ("input_ids", "attention_mask"))
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            out.append(torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

"""Experts and students: `transformers` sequence classifiers (from a config or a pretrained checkpoint), and
moekd's own families: the n-gram bag (`NgramBag`) and the syntax-graph network (`SyntaxGraphNet`). Every model takes
input_ids/attention_mask, returns an object with `.logits` [N, 2], and is saved as config.json + model.safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from moekd_ray.config import ArchConfig, GraphConfig, NgramConfig, PretrainedConfig
from moekd_ray.int8 import is_int8, load_int8
from moekd_ray.scoring import TRAINED_LENGTH, max_input_length

PAD_ID = 1  # RoBERTa layout (see tokenization.SPECIALS)


class OwnModel(nn.Module):
    """What moekd's own families share: their settings in `spec` (saved as config.json with MODEL_TYPE), a hashed
    embedding table `embed`, the decision layer `classifier`."""

    MODEL_TYPE: str
    SPEC: type

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None) -> None:
        """config.json + model.safetensors, as transformers saves its models (`state_dict`: other weights to save)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"model_type": self.MODEL_TYPE, **self.spec.model_dump()},
                                                       indent=1))
        weights = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))


class NgramBag(OwnModel):
    """fastText-style classifier: mean of the hashed n-grams' embeddings -> dropout -> linear.
    input_ids [N, L] (bucket ids; 0 = padding), attention_mask [N, L] -> logits [N, 2]."""

    MODEL_TYPE, SPEC = "moekd-ngram-bag", NgramConfig

    def __init__(self, spec: NgramConfig):
        super().__init__()
        self.spec = spec
        self.embed = nn.EmbeddingBag(spec.buckets + 1, spec.dim, mode="mean", padding_idx=0)
        nn.init.normal_(self.embed.weight, std=0.1)
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(spec.dim, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        ids = input_ids if attention_mask is None else input_ids * attention_mask  # masked ids -> padding
        return SimpleNamespace(logits=self.classifier(self.dropout(self.embed(ids))))


class SyntaxGraphNet(OwnModel):
    """A gated graph network over the syntax tree (Devign's GGNN, kept small). input_ids [N, 3 x nodes] are
    tokenization.SyntaxGraphEncoder's triples (label bucket, 1 + parent, 1 + previous use; 0 = none or padding).
    Each of `rounds` steps, a node takes the mean message from each of its four kinds of neighbour (parent,
    children, its variable's previous and next use; one linear map per kind) and updates its state through a GRU
    cell; the graph is the mean and the max of its node states -> dropout -> linear."""

    MODEL_TYPE, SPEC = "moekd-syntax-graph", GraphConfig

    def __init__(self, spec: GraphConfig):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.buckets + 1, spec.dim, padding_idx=0)
        self.messages = nn.ModuleList(nn.Linear(spec.dim, spec.dim) for _ in range(4))
        self.update = nn.GRUCell(spec.dim, spec.dim)
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(2 * spec.dim, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        n, nodes = input_ids.shape[0], input_ids.shape[1] // 3
        slots = input_ids if attention_mask is None else input_ids * attention_mask
        label, parent, previous = slots.reshape(n, nodes, 3).unbind(-1)
        # The batch's real nodes as one graph (padding costs nothing): `packed` maps a row's node to its place
        # there. Parents and previous uses come earlier in pre-order, so every link stays among the real nodes.
        real = (label > 0).reshape(-1)
        packed = torch.cumsum(real, 0) - 1
        start = torch.arange(n, device=input_ids.device)[:, None] * nodes
        node = start + torch.arange(nodes, device=input_ids.device)[None, :]
        child, up = packed[node[parent > 0]], packed[(start + parent - 1)[parent > 0]]
        use, before = packed[node[previous > 0]], packed[(start + previous - 1)[previous > 0]]
        flows = [(child, up), (up, child), (before, use), (use, before)]  # (from, to) per kind of neighbour
        h = self.embed(label.reshape(-1)[real])
        counts = [torch.bincount(to, minlength=len(h)).clamp(min=1).unsqueeze(1) for _, to in flows]
        for _ in range(self.spec.rounds):
            incoming = torch.zeros_like(h)
            for (src, dst), linear, count in zip(flows, self.messages, counts):
                incoming = incoming + torch.zeros_like(h).index_add(0, dst, linear(h)[src]) / count
            h = self.update(incoming, h)
        graph = torch.arange(n, device=input_ids.device).repeat_interleave((label > 0).sum(1))
        size = torch.bincount(graph, minlength=n).clamp(min=1).unsqueeze(1)
        mean = torch.zeros(n, h.shape[1], dtype=h.dtype, device=h.device).index_add(0, graph, h) / size
        # an empty function (no node) pools to zeros
        top = torch.zeros_like(mean).scatter_reduce(0, graph[:, None].expand_as(h), h, "amax", include_self=False)
        return SimpleNamespace(logits=self.classifier(self.dropout(torch.cat([mean, top], -1))))


OWN_MODELS = {family.MODEL_TYPE: family for family in (NgramBag, SyntaxGraphNet)}


def decision_head(model) -> nn.Linear:
    """The final linear layer whose two outputs are the class logits."""
    return model.classifier if isinstance(model, OwnModel) else model.classifier.out_proj


@torch.no_grad()
def shift_decision(model, threshold: float) -> None:
    """Move the decision threshold into the weights: afterwards P(vulnerable) >= 0.5 exactly where it was
    >= `threshold` before (logit(p) drops by logit(threshold)), so every scorer that cuts at 0.5 (pyfunc, predict,
    attacks, evaluation) applies the threshold chosen on validation."""
    shift = float(torch.logit(torch.tensor(threshold, dtype=torch.float64)))
    bias = decision_head(model).bias
    bias[1] -= shift / 2
    bias[0] += shift / 2


def build_model(spec: ArchConfig | PretrainedConfig | NgramConfig | GraphConfig, seed: int):
    """A fresh two-class classifier: random init from `spec`, or the pretrained weights it names (safetensors only:
    a pickled pytorch_model.bin can run code when loaded)."""
    torch.manual_seed(seed)
    for family in OWN_MODELS.values():
        if isinstance(spec, family.SPEC):
            return family(spec)
    if isinstance(spec, PretrainedConfig):
        try:
            # float32 even where a hub checkpoint is stored in half precision: training keeps fp32 weights.
            model = AutoModelForSequenceClassification.from_pretrained(spec.name_or_path, num_labels=2,
                                                                       use_safetensors=True, dtype=torch.float32)
        except OSError as exc:
            raise ValueError(
                f"model {spec.name_or_path!r} cannot be loaded ({str(exc).splitlines()[0][:160]}); its weights must "
                "be safetensors: download it on a machine with hub access (or set HF_HOME to a cache holding it) or "
                "give a local folder with model.safetensors"
            ) from None
        positions = max_input_length(model)  # its positions (or the length a moekd run trained it on)
        if spec.max_length > positions:
            raise ValueError(f"max_length={spec.max_length} of expert model {spec.name_or_path!r} exceeds the "
                             f"{positions} tokens its position embeddings hold; set that expert's max_length to at "
                             f"most {positions}")
    else:
        model = RobertaForSequenceClassification(roberta_config(spec))
    # Saved in config.json with the weights: every scorer reads the length the model was trained on.
    setattr(model.config, TRAINED_LENGTH, spec.max_length)
    return model


def roberta_config(spec: ArchConfig, vocab_size: int | None = None) -> RobertaConfig:
    """The RoBERTa layout of an architecture (`vocab_size`: the trained tokenizer's, when it differs)."""
    return RobertaConfig(
        vocab_size=vocab_size or spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.ffn_size,
        max_position_embeddings=spec.max_length + 2,  # RoBERTa positions start after the padding index
        type_vocab_size=1,
        hidden_dropout_prob=spec.dropout,
        attention_probs_dropout_prob=spec.dropout,
        pad_token_id=PAD_ID,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=2,
    )


def save_float32(model, folder: str | Path, state_dict: dict) -> None:
    """Save float32 weights `state_dict` as `model`'s HF folder, recorded as float32 whatever dtype `model` trains in
    (transformers writes the module's own dtype, e.g. a DeepSpeed bf16 engine's, into config.json)."""
    model.save_pretrained(str(folder), state_dict=dict(state_dict))  # a copy: HF empties it
    config_file = Path(folder) / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dtype": "float32"}, indent=2))


def load_model(folder: str | Path):
    """A saved HF classifier (safetensors weights only), in float32 whatever dtype its config.json records: its
    size, its folded threshold and its scores are those of the float32 model. An int8 folder (`int8.save_int8`)
    loads as its int8 model."""
    if is_int8(folder):
        try:
            return load_int8(folder)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{folder}: the int8 model cannot be loaded ({str(exc).strip().splitlines()[0][:160]}); "
                             "give a folder `moekd quantize` wrote") from None
    problem = None
    config_file = Path(folder) / "config.json"
    settings = json.loads(config_file.read_text()) if config_file.is_file() else {}
    family = OWN_MODELS.get(settings.get("model_type"))
    if family is not None:
        try:
            model = family(family.SPEC.model_validate({k: v for k, v in settings.items() if k != "model_type"}))
            model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))  # strict: every key must fit
            return model
        except (OSError, RuntimeError, ValueError) as exc:
            problem = str(exc).strip().splitlines()[0][:160]
            raise ValueError(f"{folder}: the {family.__name__} model cannot be loaded ({problem}); give a folder a "
                             "moekd run wrote") from None
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(folder), use_safetensors=True, output_loading_info=True, dtype=torch.float32)
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

"""Tokenizers: a checkpoint's own, a byte-level BPE trained on the training code, (for the n-gram bag) a hasher
of C-token n-grams or syntax units, or (for the graph network) the syntax tree as a graph; any of them may read
functions after identifier canonicalisation (`CanonicalInput`)."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import RobertaProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moekd_ray.identifiers import canonicalize
from moekd_ray.c_parser import HEADERLESS, RETURN_TYPE, parse

# Identifiers, numbers and the multi-character operators of C; everything else one character at a time.
C_TOKEN = re.compile(r"[A-Za-z_]\w*|\d[\w.]*|->|\+\+|--|<<|>>|[<>=!]=|&&|\|\||[^\s\w]")

# RoBERTa's special tokens, in RoBERTa's id order (pad = 1), so configs built here match CodeBERT's layout.
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_bpe(texts: list[str], vocab_size: int, max_length: int, canonical: bool = False):
    """A byte-level BPE (RoBERTa-style: <s> ... </s>) trained on `texts` (`canonical`: on their canonical forms, and
    reading functions that way: a CanonicalInput)."""
    if canonical:
        return CanonicalInput(train_bpe([canonicalize(t) for t in texts], vocab_size, max_length))
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


_NAMED_LEAF = {"primitive_type": "type", "type_identifier": "type", "field_identifier": "field",
               "statement_identifier": "label", "number_literal": "num"}


_OPAQUE = ("string_literal", "char_literal", "comment")  # their insides are not code


def syntax_tree(text: str):
    """tree-sitter's root node of one function (Devign often drops the return type: parsed again with one)."""
    data = text.encode("utf-8", "surrogatepass")
    root = parse(data).root_node
    if root.has_error and HEADERLESS.match(data):
        alt = parse(RETURN_TYPE + data).root_node
        if not alt.has_error:
            return alt
    return root


def leaf_unit(node) -> str | None:
    """A leaf's own unit, if it has one that no renaming changes: `tok:if`, `type:int`, `field:len`, `num:4`,
    `call:memcpy`; None for a variable's name (and for other named leaves)."""
    kind = node.type
    if not node.is_named:
        return "tok:" + kind  # `if`, `->`, `+=`, `sizeof`, ...
    if kind in _NAMED_LEAF:
        return f"{_NAMED_LEAF[kind]}:{node.text.decode('utf-8', 'replace')}"
    if kind == "identifier" and node.parent is not None and node.parent.type == "call_expression" \
            and node.parent.child_by_field_name("function") == node:
        return "call:" + node.text.decode("utf-8", "replace")
    return None


def syntax_units(text: str, depth: int) -> list[str]:
    """A function as tree-sitter sees it, in pre-order: each node's root-ward path of up to `depth` node types
    ("binary_expression<if_statement"), each token that is not a variable's name (keywords, operators, type and
    field names, numbers, the names of called functions). Parameters' and locals' names never appear, so no
    renaming changes these units; the shape of the code does."""
    units, stack = [], [(syntax_tree(text), ())]
    while stack:
        node, above = stack.pop()
        path = (node.type,) + above[: depth - 1]
        if node.is_named:
            units.append("<".join(path))
        if node.child_count == 0:
            unit = leaf_unit(node)
            if unit is not None:
                units.append(unit)
        elif node.type not in _OPAQUE:
            stack.extend((child, path) for child in reversed(node.children))
    return units


# Punctuation carries no meaning the tree's shape does not already hold: not a node of the graph.
_PUNCTUATION = frozenset("; , ( ) { } [ ]".split())


def syntax_graph(text: str, max_nodes: int) -> list[tuple[str, int, int]]:
    """A function's syntax tree as a graph, in pre-order, cut at `max_nodes` nodes: per node (label, parent, previous
    use), indices into this list (-1: none). Labels are node types, or a leaf's `leaf_unit`; a variable's name is
    the label "var" and links to the previous node naming the same variable (data flow: ReVeal's "last use" edges),
    so a renaming changes nothing here and the variables' flow is still seen."""
    nodes, last_use, stack = [], {}, [(syntax_tree(text), -1)]
    while stack and len(nodes) < max_nodes:
        node, parent = stack.pop()
        if node.child_count == 0 and not node.is_named and node.type in _PUNCTUATION:
            continue
        index, previous = len(nodes), -1
        if node.child_count == 0:
            label = leaf_unit(node)
            if label is None and node.type == "identifier":
                name = node.text.decode("utf-8", "replace")
                label, previous = "var", last_use.get(name, -1)
                last_use[name] = index
            label = label or node.type
        else:
            label = node.type
            if node.type not in _OPAQUE:
                stack.extend((child, index) for child in reversed(node.children))
        nodes.append((label, parent, previous))
    return nodes


class NgramHasher:
    """The bag models' tokenizer: each unit hashed (crc32, the same on every machine) to a bucket in 1..buckets (0 is
    padding). Units are a function's C tokens and their runs of up to `ngram` tokens (units "tokens"), or its
    syntax units (units "syntax", `syntax_units` with paths of up to `ngram` node types). Nothing to train; called
    like a HF tokenizer."""

    FILE = "ngram_hasher.json"

    def __init__(self, buckets: int, ngram: int, max_length: int, units: str = "tokens"):
        self.buckets, self.ngram, self.max_length, self.units = buckets, ngram, max_length, units

    def __len__(self) -> int:
        return self.buckets

    def ids(self, text: str, max_length: int, with_ngrams: bool = True) -> list[int]:
        if self.units == "syntax" and with_ngrams:
            grams = syntax_units(text, self.ngram)
        else:  # (a bare name, for ALERT's substitute search, is its token whatever the units)
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
            {"buckets": self.buckets, "ngram": self.ngram, "max_length": self.max_length, "units": self.units}))


class SyntaxGraphEncoder:
    """The graph expert's tokenizer (models.SyntaxGraphNet): `syntax_graph` packed as three ids per node, so that the
    graph travels as input_ids/attention_mask like every other model's input: the node's label hashed (crc32) to
    1..buckets, 1 + its parent's index, 1 + its variable's previous use's index (0: none). `max_length` counts
    nodes: a row is 3 x max_length ids wide. Called like a HF tokenizer."""

    FILE = "graph_encoder.json"
    SLOTS = 3

    def __init__(self, buckets: int, max_length: int):
        self.buckets, self.max_length = buckets, max_length

    def __len__(self) -> int:
        return self.buckets

    def bucket(self, label: str) -> int:
        return zlib.crc32(label.encode()) % self.buckets + 1

    def ids(self, text: str, max_nodes: int) -> list[int]:
        return [v for label, parent, previous in syntax_graph(text, max_nodes)
                for v in (self.bucket(label), parent + 1, previous + 1)]

    def __call__(self, texts, truncation: bool = True, max_length: int | None = None, padding=False,
                 add_special_tokens: bool = True, **_):
        """{"input_ids", "attention_mask"} per text (padding="max_length": every row 3 x max_length wide).
        add_special_tokens=False: a bare name's bucket (ALERT's substitute search), as a bag would give it."""
        single = isinstance(texts, str)
        nodes = max_length or self.max_length
        texts = [texts] if single else texts
        rows = [self.ids(t, nodes) if add_special_tokens else [self.bucket(t.strip())] for t in texts]
        width = self.SLOTS * nodes if padding == "max_length" else max((len(r) for r in rows), default=0)
        ids = [r + [0] * (width - len(r)) for r in rows] if padding else rows
        mask = [[1] * len(r) + [0] * (len(i) - len(r)) for r, i in zip(rows, ids)]
        return {"input_ids": ids[0] if single else ids, "attention_mask": mask[0] if single else mask}

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / self.FILE).write_text(json.dumps({"buckets": self.buckets, "max_length": self.max_length}))


class CanonicalInput:
    """A tokenizer that reads each function after identifier canonicalisation (parameters and locals renamed to
    v0, v1, ... by first occurrence, with the renaming attacks' own finder: identifiers.canonicalize), so a
    renamed function is tokenised exactly as its original. The defence travels with the tokenizer: `save_pretrained`
    writes a marker file beside it and `load_tokenizer` wraps the tokenizer again, so training, the attacks'
    victims, the registered pyfunc and `moekd predict` all transform alike. Everything else is the inner
    tokenizer's."""

    FILE = "input_transform.json"
    NAME = "canonical_identifiers"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts, *args, add_special_tokens: bool = True, **kwargs):
        if add_special_tokens:  # a function; add_special_tokens=False is a bare name (ALERT's substitute search)
            texts = canonicalize(texts) if isinstance(texts, str) else [canonicalize(t) for t in texts]
        return self.tokenizer(texts, *args, add_special_tokens=add_special_tokens, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name):
        if name == "tokenizer":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(str(folder))
        (Path(folder) / self.FILE).write_text(json.dumps({"input_transform": self.NAME}))


def with_input_transform(tokenizer, canonical: bool):
    """`tokenizer` as it should read functions: wrapped in CanonicalInput when `canonical` (not twice)."""
    if not canonical or isinstance(tokenizer, CanonicalInput):
        return tokenizer
    return CanonicalInput(tokenizer)


def load_tokenizer(name_or_path: str | Path):
    """A saved tokenizer folder or a hub name (with its input transform, if one was saved with it); a clear error
    when it is neither cached nor reachable."""
    folder = Path(name_or_path)
    marker = folder / CanonicalInput.FILE
    if marker.is_file():
        name = json.loads(marker.read_text()).get("input_transform")
        if name != CanonicalInput.NAME:
            raise ValueError(f"{marker}: unknown input_transform {name!r}; this moekd-ray knows "
                             f"{CanonicalInput.NAME!r} (a newer moekd-ray wrote it?)")
    for kind in (NgramHasher, SyntaxGraphEncoder):  # moekd's own tokenizers: their settings in one JSON file
        if (folder / kind.FILE).is_file():
            return with_input_transform(kind(**json.loads((folder / kind.FILE).read_text())), marker.is_file())
    try:
        return with_input_transform(AutoTokenizer.from_pretrained(str(name_or_path)), marker.is_file())
    except OSError as exc:
        raise ValueError(
            f"tokenizer {name_or_path!r} cannot be loaded ({str(exc).splitlines()[0][:160]}); download it on a "
            "machine with hub access or give a local folder"
        ) from None


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """input_ids/attention_mask padded to `max_length`, as int32 arrays (cheap to ship to Ray workers)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")
    return {k: np.asarray(enc[k], dtype=np.int32) for k in ("input_ids", "attention_mask")}

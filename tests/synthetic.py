"""A small synthetic C dataset whose label is known from the code: a function copies a caller's string into a
local buffer either unbounded (strcpy / sprintf / gets: vulnerable, 1) or bounded (strncpy / snprintf / fgets with
the buffer's size: safe, 0), among random identifiers and filler statements. A model that learns anything about
the code separates the classes; one that does not stays near 50%."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

WORDS = ["buf", "data", "name", "len", "tmp", "ctx", "node", "item", "val", "ptr", "src", "dst", "res", "cfg", "msg",
         "key", "path", "line", "count", "size", "idx", "out", "in", "head", "tail", "state", "flag", "opt", "str"]

UNBOUNDED = ["strcpy({dst}, {src});", "sprintf({dst}, \"%s\", {src});", "strcat({dst}, {src});"]
BOUNDED = ["strncpy({dst}, {src}, sizeof({dst}) - 1);", "snprintf({dst}, sizeof({dst}), \"%s\", {src});",
           "strncat({dst}, {src}, sizeof({dst}) - strlen({dst}) - 1);"]
FILLER = ["int {a} = {n};", "{a} += {n};", "if ({a} > {n}) {{ {a} = 0; }}", "for (int {a} = 0; {a} < {n}; {a}++) "
          "{{ total += {a}; }}", "log_debug(\"{a}=%d\", {a});", "{a} = {a} * 2 + {n};", "while ({a} > 0) {{ {a}--; }}"]


def _name(rng: random.Random) -> str:
    return rng.choice(WORDS) + rng.choice(["", "_", "2"]) + rng.choice(WORDS + [""])


def function(rng: random.Random, vulnerable: bool) -> str:
    dst, src, fn = _name(rng) + "_buf", _name(rng), "handle_" + _name(rng)
    body = [f"char {dst}[{rng.choice([16, 32, 64, 128])}];", "int total = 0;"]
    for _ in range(rng.randint(2, 6)):
        body.append(rng.choice(FILLER).format(a=_name(rng), n=rng.randint(1, 99)))
    copy = rng.choice(UNBOUNDED if vulnerable else BOUNDED).format(dst=dst, src=src)
    body.insert(rng.randint(2, len(body)), copy)
    body.append(f"return total + (int){dst}[0];")
    return f"int {fn}(const char *{src})\n{{\n    " + "\n    ".join(body) + "\n}\n"


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        target = i % 2
        out.append({"project": rng.choice(["alpha", "beta"]), "commit_id": None, "target": target,
                    "func": function(rng, bool(target)), "idx": i})
    rng.shuffle(out)
    return out


def write_dataset(folder: Path, n_train: int = 400, n_eval: int = 120, seed: int = 0) -> Path:
    """train/valid/test .jsonl.gz in `folder`, as the Devign folder holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("valid", n_eval, seed + 1), ("test", n_eval, seed + 2)):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as f:
            for row in rows(n, s):
                f.write(json.dumps(row) + "\n")
    return folder


def write_devign_like(folder: Path, n_train: int = 800, n_eval: int = 200, seed: int = 0) -> Path:
    """A stand-in for the Devign folder (../shared/data/devign) where the real one is absent: the same file names
    and fields (project, commit_id, target, func, idx; train/valid also uid, idx_exact, split_exact,
    p_official_split), FFmpeg and qemu rows, the synthetic functions above as `func` (learnable label)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    idx = 0
    for split, n, s in (("train", n_train, seed), ("valid", n_eval, seed + 1), ("test", n_eval, seed + 2)):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as f:
            for row in rows(n, s):
                project = rng.choice(["FFmpeg", "qemu"])
                out = {"project": project, "commit_id": None, "target": row["target"], "func": row["func"], "idx": idx}
                if split == "test":
                    out["commit_id"] = "%040x" % rng.getrandbits(160)
                else:
                    out.update(uid=f"{project}:{idx}", idx_exact=True, split_exact=True, p_official_split=1.0)
                f.write(json.dumps(out) + "\n")
                idx += 1
    return folder

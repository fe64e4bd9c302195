"""The defence and the attack on real Devign code: is canonicalisation invariant to renaming, and do structural
edits keep functions parseable with the same identifiers and calls?

    python docs/robustness_probe.py [N]      # the first N validation functions (default 400); reads MOEKD_DATA_DIR
                                             # or ../shared/data/devign like the package
"""
import random
import sys

from moekd_ray.identifiers import Identifiers, canonicalize, error_count
from moekd_ray.attacks.structural import Structure, names_and_calls
from moekd_ray.config import DataConfig
from moekd_ray.data import read_jsonl, resolve_data_dir, split_file



n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
funcs = [r["func"] for r in read_jsonl(split_file(resolve_data_dir(DataConfig()), "valid"), 200_000)[:n]]
rng = random.Random(0)
same = renamable = 0
for code in funcs:
    ids = Identifiers(code)
    if ids.names:
        renamable += 1
        renamed = ids.rename({name: f"zz{rng.randrange(10**6)}_{i}" for i, name in enumerate(ids.names)})
        same += canonicalize(renamed) == canonicalize(code)
print(f"canonical(renamed) == canonical(original): {same} of {renamable} functions with renamable names")
edits = parse_ok = kept = changed = 0
for code in funcs:
    structure, before, errors = Structure(code), names_and_calls(code), error_count(code)
    for edit in structure.edits[:10]:
        new = structure.apply(edit)
        edits += 1
        changed += new != code
        parse_ok += error_count(new) <= errors
        kept += names_and_calls(new) == before
print(f"{edits} structural edits (at most 10 a function): {parse_ok} parse no worse, {kept} keep identifiers and "
      f"calls, {changed} change the text")

"""Stage: the training functions split into the K experts' parts (the strategy is partition.py's), with every
split's code features, which the router reads too. Nothing to reuse on resume: it is recomputed, from the same seed.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from moekd_ray.data import SPLITS
from moekd_ray.partition import features_and_parts, partition_table
from moekd_ray.stages.context import RunContext


def partition_stage(ctx: RunContext) -> tuple[dict[str, sp.spmatrix], np.ndarray]:
    """(each split's code features, each training row's part); the parts' sizes and label balance are logged."""
    cfg, tracker, funcs = ctx.cfg, ctx.tracker, ctx.funcs
    with ctx.timer("partition"), tracker.stage("partition", cfg.partition.model_dump(mode="json")):
        p = cfg.partition
        features, parts = features_and_parts({s: funcs[s] for s in SPLITS}, list(ctx.data["train"]["project"]),
                                             p.strategy.value, cfg.experts.k, cfg.seed, p.hash_features)
        table = partition_table(parts, ctx.labels["train"], cfg.experts.k)
        tracker.log_dict(table, "partition.json")
        for row in table:
            ctx.log(f"part {row['part']}: {row['rows']} rows, {row['vulnerable_share']:.1%} vulnerable")
            tracker.log_metrics({f"part_{row['part']}_rows": row["rows"],
                                 f"part_{row['part']}_vulnerable_share": row["vulnerable_share"]})
    return features, parts

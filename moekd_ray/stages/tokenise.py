"""Stage: the tokenizers (trained, or reused on resume) and every split encoded for each expert and the student.

The tokenizers themselves are made by stages/experts.py (`make_tokenizers`, shared with the benchmark) and saved in
the run folder's tokenizers/, which is logged as an artifact of the stage's MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass

from moekd_ray.data import SPLITS
from moekd_ray.stages.context import RunContext
from moekd_ray.stages.experts import encode_for_experts, make_tokenizers
from moekd_ray.tokenization import encode


@dataclass
class Encoded:
    """The tokenizers and the splits they encoded: `experts[k]` expert k's encoded splits, `student` the student's,
    `student_max` the student's input length."""
    expert_toks: list
    student_tok: object
    experts: list[dict]
    student: dict
    student_max: int


def tokenizers_stage(ctx: RunContext) -> Encoded:
    """Make (or reuse) the experts' and the student's tokenizers and encode every split with them."""
    cfg, run_dir, tracker = ctx.cfg, ctx.run_dir, ctx.tracker
    with ctx.timer("tokenizers"), tracker.stage("tokenizers"):
        expert_toks, student_tok = ctx.finished.tokenizers()
        if expert_toks is None:
            expert_toks, student_tok = make_tokenizers(cfg, ctx.funcs["train"], run_dir)
        else:
            ctx.timer.reused("tokenizers")
        enc_expert = encode_for_experts(cfg, expert_toks, ctx.funcs)
        student_max = cfg.distill.arch().max_length
        enc_student = {s: encode(student_tok, ctx.funcs[s], student_max) for s in SPLITS}
        tracker.log_artifact(run_dir / "tokenizers", "tokenizers")
        tracker.log_metrics({"student_vocab": len(student_tok),
                             **{f"expert_{k}_vocab": len(t) for k, t in enumerate(expert_toks)}})
    return Encoded(expert_toks, student_tok, enc_expert, enc_student, student_max)

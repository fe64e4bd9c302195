"""The distillation losses: KD towards the teachers' targets, and the consistency term of robust distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float,
) -> torch.Tensor:
    """alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T).

    student_logits [N, C]; teacher_probs [N, C] are the aggregated targets already softened at T (see
    router.mixture_probs); T^2 keeps the soft term's gradients on the scale of the hard term's (Hinton et al.).
    alpha = 0 is Compressor's soft-only loss; alpha = 1 is plain fine-tuning on labels.
    """
    log_student_t = F.log_softmax(student_logits / temperature, dim=-1)
    soft = F.kl_div(log_student_t, teacher_probs, reduction="batchmean") * temperature**2
    if alpha == 0:
        return soft
    hard = F.cross_entropy(student_logits, labels)
    return alpha * hard + (1 - alpha) * soft


def consistency_loss(copy_logits: torch.Tensor, original_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(student_T(original) || student_T(copy)), the original's side held fixed (no gradient): a renamed or
    restructured copy is pulled towards the student's own answer on its original, beyond the teachers' target
    both share (consistency distillation). copy_logits, original_logits [M, C]; 0 for an empty batch."""
    if len(copy_logits) == 0:
        return copy_logits.sum() * 0.0
    target = F.softmax(original_logits.detach() / temperature, dim=-1)
    return F.kl_div(F.log_softmax(copy_logits / temperature, dim=-1), target, reduction="batchmean") * temperature**2

"""The cosine loss between student and teacher hidden states, with a projection when widths differ.

Shape suffixes as in student_train/losses/__init__.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class HiddenProjection(nn.Linear):
    """Student width -> teacher width, no bias; the identity when the widths are equal."""

    def __init__(self, student_width: int, teacher_width: int, device=None, dtype=None):
        super().__init__(student_width, teacher_width, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        # Also what FSDP calls after meta-device init, so the identity survives it.
        if self.in_features == self.out_features:
            with torch.no_grad():
                nn.init.eye_(self.weight)
        else:
            super().reset_parameters()


def build_hidden_projection(student_width: int, teacher_width: int, force: bool = False) -> HiddenProjection | None:
    """A projection when the widths differ or when asked for; None means compare directly."""
    if student_width < 1 or teacher_width < 1:
        raise ValueError(f"hidden widths must be >= 1, got {student_width} and {teacher_width}")
    if student_width == teacher_width and not force:
        return None
    return HiddenProjection(student_width, teacher_width)


def hidden_cosine_loss(
    student_hidden_ND: Tensor,
    teacher_hidden_NE: Tensor,
    mask_N: Tensor,
    projection: nn.Module | None,
    num_valid_global: float,
) -> Tensor:
    """sum over positions where mask_N of (1 - cos(projection(student), teacher)) / num_valid_global."""
    num_valid_global = float(num_valid_global)
    if not num_valid_global > 0:
        raise ValueError(f"num_valid_global must be > 0, got {num_valid_global}")
    n = student_hidden_ND.shape[0]
    if mask_N.shape != (n,) or mask_N.dtype != torch.bool or teacher_hidden_NE.shape[0] != n:
        raise ValueError(f"need student [N, D], teacher [N, E] and a bool mask [N], got "
                         f"{tuple(student_hidden_ND.shape)}, {tuple(teacher_hidden_NE.shape)}, "
                         f"{mask_N.dtype} {tuple(mask_N.shape)}")
    student_ME = student_hidden_ND[mask_N]
    if projection is not None:
        student_ME = projection(student_ME)
    teacher_ME = teacher_hidden_NE[mask_N]
    if student_ME.shape[-1] != teacher_ME.shape[-1]:
        raise ValueError(f"student width {student_ME.shape[-1]} != teacher width {teacher_ME.shape[-1]}: "
                         "pass a HiddenProjection")
    dtype = torch.promote_types(torch.promote_types(student_ME.dtype, teacher_ME.dtype), torch.float32)
    student_ME, teacher_ME = student_ME.to(dtype), teacher_ME.to(dtype)
    # Clamped norms: an all-zero row gives cos 0 and a finite gradient instead of nan.
    eps = 1e-8
    cos_M = (student_ME * teacher_ME).sum(-1) / (
        student_ME.norm(dim=-1).clamp_min(eps) * teacher_ME.norm(dim=-1).clamp_min(eps))
    return (1 - cos_M).sum() / num_valid_global

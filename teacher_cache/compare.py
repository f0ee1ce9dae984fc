"""Two top-k caches of the same source rows, compared row by row: e.g. one
written on a GPU (bf16 lm_head, several workers) against one written on the
CPU. Rows are matched by row_id.

Shape suffixes: P target positions, K top-k width.
"""

from __future__ import annotations

import numpy as np
import torch

from common.shard_format import TeacherRow
from common.targets.topk import TopkRowTargets


def compare(a: dict[int, TeacherRow], b: dict[int, TeacherRow]) -> dict:
    """Row coverage; where the rows match, the largest log-sum-exp difference, the mean
    overlap of the top-k id sets per position, the mean |logit| difference on shared ids
    and the smallest cosine between hidden-state rows. A ValueError when the two hold
    different kinds of targets or hidden layers."""
    report = {"rows_a": len(a), "rows_b": len(b), "same_row_ids": sorted(a) == sorted(b)}
    if not report["same_row_ids"]:
        return report
    lse_diff, overlap, logit_diff, min_cos, same_tokens = 0.0, [], [], 1.0, True
    for rid in sorted(a):
        ra, rb = a[rid], b[rid]
        if type(ra.targets) is not type(rb.targets) or set(ra.hidden) != set(rb.hidden):
            raise ValueError(f"row {rid}: the caches hold different targets or hidden layers "
                             f"(layers {sorted(ra.hidden)} and {sorted(rb.hidden)}); nothing to compare")
        if not (np.array_equal(ra.input_ids_L, rb.input_ids_L) and np.array_equal(ra.labels_L, rb.labels_L)):
            same_tokens = False  # other tokens: their targets are not comparable
            continue
        ta, tb = ra.targets, rb.targets
        if isinstance(ta, TopkRowTargets):  # other kinds: coverage, tokens and hidden states only
            lse_diff = max(lse_diff, float(np.abs(ta.lse_PT - tb.lse_PT).max(initial=0.0)))
            for p in range(ta.ids_PK.shape[0]):
                shared, ia, ib = np.intersect1d(ta.ids_PK[p], tb.ids_PK[p], return_indices=True)
                overlap.append(len(shared) / ta.ids_PK.shape[1])
                if len(shared):
                    logit_diff.append(float(np.abs(ta.logits_PK[p, ia] - tb.logits_PK[p, ib]).mean()))
        for layer, h_a in ra.hidden.items():
            cos = torch.nn.functional.cosine_similarity(h_a.double(), rb.hidden[layer].double(), dim=-1)
            min_cos = min(min_cos, float(cos.min()))
    report.update(same_tokens=bool(same_tokens), max_lse_diff=lse_diff,
                  mean_topk_overlap=float(np.mean(overlap)) if overlap else None,
                  mean_abs_logit_diff=float(np.mean(logit_diff)) if logit_diff else None,
                  min_hidden_cosine=min_cos)
    return report

"""Tiny teacher caches and training configs for the `vpmoe train` tests.

Caches are written with the real shard writer from a tiny random teacher's
logits (position t holds the teacher's distribution for token t + 1, so the
targets are shifted exactly as a cache-teacher run shifts them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from synthetic_cache import write_cache_rows

from common.shard_format import TeacherRow
from common.spec import HiddenSpec, ShardSpec, TargetSpec
from common.targets.sampled import SampledRowTargets
from common.targets.topk import TopkRowTargets
from demo.tiny_models import (
    build_model,
    save_model,
    tiny_gpt_oss_config,
    tiny_llama_config,
)
from student_train.config import load_config

VOCAB = 300


def make_rows(num_rows: int, min_len: int, max_len: int, seed: int, vocab: int = VOCAB):
    """Random token rows with distinct first tokens; the first 3 labels are masked like a prompt."""
    rng = np.random.default_rng(seed)
    rows = []
    firsts = rng.permutation(vocab)[:num_rows]
    for i in range(num_rows):
        length = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(0, vocab, size=length).astype(np.int32)
        ids[0] = firsts[i]
        labels = ids.copy()
        labels[:3] = -100
        rows.append((ids, labels))
    return rows


@torch.no_grad()
def write_cache(cache_dir: Path, rows, teacher, *, mode: str = "topk", k: int = 16,
                temperatures=(1.0, 2.0), num_samples: int = 32, hidden_layers=(), rows_per_shard: int = 8,
                vocab: int | None = None) -> ShardSpec:
    vocab = vocab or teacher.config.vocab_size
    hidden_size = teacher.config.hidden_size if hidden_layers else 0
    targets = (TargetSpec(mode="topk", k=k, temperatures=tuple(temperatures)) if mode == "topk"
               else TargetSpec(mode="sampled", num_samples=num_samples, seed=0))
    spec = ShardSpec(vocab_size=vocab, targets=targets, hidden=HiddenSpec(layers=tuple(hidden_layers),
                                                                          hidden_size=hidden_size))
    gen = torch.Generator().manual_seed(0)
    cached = []
    for row_id, (ids, labels) in enumerate(rows):
        out = teacher(input_ids=torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True)
        logits_PV = out.logits[0, :-1].double()  # position t: the distribution of token t + 1
        row = TeacherRow(row_id=row_id, input_ids_L=ids, labels_L=labels)
        if mode == "topk":
            top = logits_PV.topk(k, dim=-1)
            lse_PT = torch.stack([torch.logsumexp(logits_PV / t, -1) for t in temperatures], -1)
            row.targets = TopkRowTargets(ids_PK=top.indices.numpy(), logits_PK=top.values.float().numpy(),
                                         lse_PT=lse_PT.float().numpy())
        else:
            draws_PS = torch.multinomial(torch.softmax(logits_PV, -1), num_samples, replacement=True,
                                         generator=gen)
            ids_S, counts_S, sizes_P = [], [], []
            for draws in draws_PS:
                u, c = torch.unique(draws, return_counts=True)
                ids_S.append(u.numpy())
                counts_S.append(c.numpy())
                sizes_P.append(len(u))
            row.targets = SampledRowTargets(sizes_P=np.asarray(sizes_P), ids_S=np.concatenate(ids_S),
                                            counts_S=np.concatenate(counts_S))
        for layer in hidden_layers:
            row.hidden[layer] = out.hidden_states[layer][0].float()  # stream leaving block `layer`
        cached.append(row)
    shards = [cached[start:start + rows_per_shard] for start in range(0, len(cached), rows_per_shard)]
    write_cache_rows(cache_dir, spec, shards, teacher={"model": "tiny"}, source={"path": "synthetic"},
                     work={"rows_per_shard": rows_per_shard})
    return spec


def tiny_teacher(layers: int = 3, hidden: int = 48, seed: int = 7):
    return build_model(tiny_llama_config(VOCAB, hidden_size=hidden, num_layers=layers, intermediate_size=96),
                       seed=seed).eval()


def save_tiny_student(out_dir: Path, kind: str = "gpt_oss", seed: int = 1, hidden: int = 64) -> Path:
    if kind == "gpt_oss":
        config = tiny_gpt_oss_config(VOCAB, hidden_size=hidden, num_layers=2)
    else:
        config = tiny_llama_config(VOCAB, hidden_size=hidden, num_layers=2, intermediate_size=2 * hidden)
    return save_model(build_model(config, seed=seed, lm_head_scale=1.0), out_dir)


def tiny_config(tmp: Path, student: Path, train_cache: Path, eval_cache: Path | None = None, *sets: str):
    """tiny_cpu.yaml with this test's paths, then `section.key=value` overrides."""
    base = [f"student.path={student}", f"data.train_cache={train_cache}",
            f"checkpoint.dir={tmp / 'run' / 'checkpoints'}", f"log.jsonl={tmp / 'run' / 'log.jsonl'}",
            f"export.dir={tmp / 'run' / 'export'}"]
    base.append(f"data.eval_cache={eval_cache}" if eval_cache else "eval.every=0")
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml", [*base, *sets])


def random_loss_case(n: int, vocab: int, width: int, k: int, temperatures, kl_index: int, seed: int):
    """float64 loss inputs: student hidden states and lm_head, labels with about a fifth masked,
    and a random teacher's top-k targets with log-sum-exps at `temperatures` (the KL at
    temperatures[kl_index]). Also returns the generator, for what a test draws next."""
    from common.causal_lm import IGNORE_INDEX
    from student_train.losses import TopkTargets

    gen = torch.Generator().manual_seed(seed)
    hidden_ND = torch.randn(n, width, generator=gen, dtype=torch.float64)
    weight_VD = torch.randn(vocab, width, generator=gen, dtype=torch.float64) * 0.5
    teacher_NV = 2.0 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    labels_N = torch.randint(0, vocab, (n,), generator=gen)
    labels_N[torch.rand(n, generator=gen) < 0.2] = IGNORE_INDEX
    ids_NK = teacher_NV.topk(k, dim=1).indices.sort(dim=1).values
    lse_NT = torch.stack([torch.logsumexp(teacher_NV / t, -1) for t in temperatures], 1)
    targets = TopkTargets(ids_NK, teacher_NV.gather(1, ids_NK), lse_NT, kl_index)
    return hidden_ND, weight_VD, labels_N, targets, gen

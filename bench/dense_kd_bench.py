"""How exact each kind of cached target is against the teacher's true distribution, per token,
and what it costs in bytes: dense (the last-layer state in fp8 or bf16 through the teacher's own
final norm and lm_head), top-k with the exact tail bucket, and sampled draws.

Truth: the teacher's float64 logits. Per variant and token, with p the true and v the variant's
distribution over the full vocabulary:
- dense-fp8 / dense-bf16: v = softmax(lm_head(norm(stored h))); KL(p || v) and KL(v || p).
- topk-K: the K kept probabilities (as the shard codes them) plus the exact tail mass spread
  uniformly over the other ids (the least-informed completion); KL(p || v) measures what the
  cache does not say about the tail.
- sampled-N: v = counts / N (the unbiased target); KL(v || p) (KL(p || v) is infinite).

    # the quickstart's teacher (bash scripts/quickstart.sh runs/quickstart, or any HF teacher + data)
    python bench/dense_kd_bench.py --teacher runs/quickstart/teacher --data runs/quickstart/data
    # GPT-OSS-20B shape with random weights, on a GPU (head cost; exactness on random weights)
    python bench/dense_kd_bench.py --gptoss-shape --device cuda

Shape suffixes: N tokens, V vocabulary, E teacher width, K top-k width.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from common import codec
from common.spec import ShardSpec, TargetSpec
from common.teacher_head import TeacherHead


def kl_rows(logp_NV: torch.Tensor, logq_NV: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities (0 * log 0 = 0)."""
    p_NV = logp_NV.exp()
    return torch.where(p_NV > 0, p_NV * (logp_NV - logq_NV), torch.zeros_like(p_NV)).sum(-1)


def teacher_states(args) -> tuple[TeacherHead, torch.Tensor]:
    """(the teacher's head in float64, its last-layer states [N, E] float64) of real rows."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.teacher, use_safetensors=True, dtype=torch.float64).eval()
    ids_BL = torch.tensor(np.stack(load_from_disk(args.data)[args.split].with_format("numpy")["input_ids"][: args.rows]),
                          dtype=torch.int64)
    captured = []
    last = model.model.layers[-1]
    hook = last.register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for row in ids_BL:
            model.model(input_ids=row[None])
    hook.remove()
    head = TeacherHead(model.model.norm.weight.detach(), model.lm_head.weight.detach(), model.config.rms_norm_eps)
    return head, torch.cat([c[0] for c in captured])


def random_states(args) -> tuple[TeacherHead, torch.Tensor]:
    """GPT-OSS-20B's head shape with random weights, residual streams of a realistic spread."""
    gen = torch.Generator().manual_seed(0)
    V, E = 201_088, 2880
    head = TeacherHead(1 + 0.1 * torch.randn(E, generator=gen), 0.02 * torch.randn(V, E, generator=gen), 1e-5)
    return head, 4 * torch.randn(args.rows * 64, E, generator=gen)


def measure(head: TeacherHead, hidden_NE: torch.Tensor, args) -> dict:
    device = torch.device(args.device)
    head = head.to(device)
    hidden_NE = hidden_NE.to(device)
    E, V = head.width, head.vocab_size
    spec = ShardSpec(vocab_size=V, targets=TargetSpec(k=args.top_k))
    results = {"tokens": int(hidden_NE.shape[0]), "vocab": V, "width": E}
    per = {name: [] for name in ("dense-fp8", "dense-bf16", f"topk-{args.top_k}", f"sampled-{args.samples}")}
    reverse = {name: [] for name in per}
    distinct = []
    gen = torch.Generator(device=device).manual_seed(1)
    for start in range(0, hidden_NE.shape[0], args.chunk):
        h_CE = hidden_NE[start:start + args.chunk].double()
        logp_CV = torch.log_softmax(head.logits(h_CE, torch.float64) / args.temperature, -1)
        fp8_CE, scale_C = codec.quantize_fp8(h_CE.float())
        stored = {"dense-fp8": fp8_CE.double() * scale_C.double()[:, None],
                  "dense-bf16": h_CE.to(torch.bfloat16).double()}
        for name, s_CE in stored.items():
            logv_CV = torch.log_softmax(head.logits(s_CE, torch.float64) / args.temperature, -1)
            per[name].append(kl_rows(logp_CV, logv_CV).cpu())
            reverse[name].append(kl_rows(logv_CV, logp_CV).cpu())
        # top-k: kept logits as the shard codes them (companded gaps below an exact max), tail uniform
        logits_CV = logp_CV * args.temperature  # shifted logits: the same softmax
        top_CK, ids_CK = logits_CV.topk(args.top_k, -1)
        gap_CK = (top_CK[:, :1] - top_CK).cpu().numpy().reshape(-1)
        decoded_CK = top_CK[:, :1] - torch.from_numpy(codec.decode_values(codec.encode_values(
            gap_CK, spec.targets.value_scale), spec.targets.value_scale)).to(device).double().view_as(top_CK)
        lse_C = torch.logsumexp(logits_CV / args.temperature, -1)
        logk_CK = decoded_CK / args.temperature - lse_C[:, None]
        tail_C = (1 - logk_CK.exp().sum(-1)).clamp_min(1e-300)
        logv_CV = (tail_C.log() - math.log(V - args.top_k))[:, None].expand_as(logp_CV).clone()
        logv_CV.scatter_(1, ids_CK, logk_CK)
        name = f"topk-{args.top_k}"
        per[name].append(kl_rows(logp_CV, logv_CV).cpu())
        reverse[name].append(kl_rows(logv_CV, logp_CV).cpu())
        # sampled: N draws at this temperature, counts / N
        draws_CS = torch.multinomial(logp_CV.exp(), args.samples, replacement=True, generator=gen)
        counts_CV = torch.zeros_like(logp_CV).scatter_add_(1, draws_CS, torch.ones_like(draws_CS, dtype=torch.float64))
        distinct.append((counts_CV > 0).sum(-1).cpu())
        logs_CV = (counts_CV / args.samples).log()
        name = f"sampled-{args.samples}"
        per[name].append(torch.full((h_CE.shape[0],), math.inf))
        reverse[name].append(kl_rows(logs_CV, logp_CV).cpu())
    distinct_mean = float(torch.cat(distinct).double().mean())
    id_bytes = spec.id_bytes
    bytes_per_token = {"dense-fp8": E + 4, "dense-bf16": 2 * E,
                       f"topk-{args.top_k}": spec.targets.kind.bytes_per_token(spec),
                       f"sampled-{args.samples}": 2 + distinct_mean * (id_bytes + 1)}
    for name in per:
        forward_N, reverse_N = torch.cat(per[name]).double(), torch.cat(reverse[name]).double()
        results[name] = {"kl_true_to_variant_mean": float(forward_N.mean()),
                         "kl_true_to_variant_p99": float(forward_N.quantile(0.99)) if forward_N.isfinite().all() else math.inf,
                         "kl_variant_to_true_mean": float(reverse_N.mean()),
                         "bytes_per_token_uncompressed": bytes_per_token[name]}
    results["sampled_distinct_ids_mean"] = distinct_mean
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="HF teacher directory (safetensors)")
    parser.add_argument("--data", help="save_to_disk dataset directory of token rows")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--gptoss-shape", action="store_true", help="random weights at GPT-OSS-20B's head shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not args.gptoss_shape and not (args.teacher and args.data):
        parser.error("give --teacher and --data, or --gptoss-shape")
    torch.manual_seed(0)
    start = time.perf_counter()
    head, hidden_NE = random_states(args) if args.gptoss_shape else teacher_states(args)
    results = measure(head, hidden_NE, args)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["args"] = vars(args)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

"""Proof on real text: does distillation from the cache beat plain training, and
which targets are worth their bytes? (docs/BENCHMARKS.md, "Distillation quality")

Runs on one GPU with the product's own commands (`vpmoe cache-teacher`,
`vpmoe train`), in three steps that share a work directory:

    python bench/proof_distill.py prepare  --work /tmp/proof   # corpus, tokenizer, teacher, caches
    python bench/proof_distill.py students --work /tmp/proof --variants ce,tail_k8,...
    python bench/proof_distill.py report   --work /tmp/proof   # markdown table

The same at CPU scale (stdlib sources, a 4-layer teacher, 2-layer students):

    python bench/proof_distill.py prepare --device cpu --work runs/proof-cpu --corpus-mb 24 --vocab 2048 \
        --seq-len 128 --train-rows 40000 --val-rows 240 --cache-rows 4800 --teacher-hidden 128 --teacher-layers 4 \
        --teacher-steps 1500 --student-hidden 64 --student-layers 2
    python bench/proof_distill.py students --device cpu --work runs/proof-cpu --vocab 2048 --seq-len 128 \
        --teacher-hidden 128 --teacher-layers 4 --student-hidden 64 --student-layers 2 --steps 300 \
        --global-batch 16 --micro-batch 16 --lr 3e-3

Corpus: the Python sources of the machine's installed packages, split by file
into train and held-out sets; a 32k byte-level BPE trained on the train split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.causal_lm import IGNORE_INDEX  # noqa: E402
from demo.pretrain import PretrainConfig, evaluate_lm, pretrain  # noqa: E402
from demo.tiny_corpus import build_dataset, read_split_texts  # noqa: E402
from demo.tiny_models import build_model, save_model, tiny_llama_config, train_bpe_tokenizer  # noqa: E402


def cache_flags(args) -> dict[str, list[str]]:
    hidden = f"{args.teacher_layers // 2},{args.teacher_layers}"  # teacher layers for the hidden-cosine variant
    return {
        "k64": ["--top-k", "64", "--temperatures", "1,2", "--hidden-layers", hidden,
                "--hidden-dtype", "fp8", "--hidden-token-fraction", "0.25"],
        "k8": ["--top-k", "8", "--temperatures", "1,2"],
        "sampled": ["--sampled", "50"],
    }


# name: (cache, loss settings, seed)
VARIANTS = {
    "ce": ("k64", dict(ce=1.0, kl=0.0), 0),
    "tail_k8": ("k8", dict(ce=0.0, kl=1.0, kl_mode="tail", kl_temperature=1.0), 0),
    "tail_k64": ("k64", dict(ce=0.0, kl=1.0, kl_mode="tail", kl_temperature=1.0), 0),
    "renorm_k8": ("k8", dict(ce=0.0, kl=1.0, kl_mode="renorm", kl_temperature=1.0), 0),
    "renorm_k64": ("k64", dict(ce=0.0, kl=1.0, kl_mode="renorm", kl_temperature=1.0), 0),
    "sampled": ("sampled", dict(ce=0.0, kl=1.0, kl_mode="sampled", kl_temperature=1.0), 0),
    # layer pairs filled in from the sizes: student (S/2, S) <- teacher (T/2, T)
    "ce_kl_hidden": ("k64", dict(ce=0.2, kl=0.2, kl_mode="tail", kl_temperature=2.0, hidden_cosine=0.6), 0),
    "tail_k64_seed1": ("k64", dict(ce=0.0, kl=1.0, kl_mode="tail", kl_temperature=1.0), 1),
}


def log(msg: str) -> None:
    print(f"[proof {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def vpmoe(*args: str) -> None:
    log("$ vpmoe " + " ".join(args))
    subprocess.run([sys.executable, "-m", "cli", *args], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})


def split_arrays(work: Path, split: str):
    from datasets import load_from_disk

    ds = load_from_disk(str(work / "data"))[split].with_format("numpy")
    return np.stack(ds["input_ids"]), np.stack(ds["labels"])


def prepare(work: Path, args) -> None:
    work.mkdir(parents=True, exist_ok=True)
    facts: dict = {}
    t0 = time.perf_counter()
    root = Path(args.corpus_root or sysconfig.get_paths()["purelib" if args.device == "cuda" else "stdlib"])
    train_texts, val_texts = read_split_texts(args.corpus_mb * 10**6, validation_fraction=0.05, root=root)
    tokenizer = train_bpe_tokenizer(train_texts[: max(1, len(train_texts) // 2)], args.vocab, work / "tokenizer")
    splits = build_dataset(work / "data", tokenizer, train_texts, val_texts, args.seq_len,
                           args.train_rows, args.val_rows)
    facts.update(corpus_root=str(root), train_files=len(train_texts), val_files=len(val_texts),
                 train_tokens=len(splits["train"]) * args.seq_len, val_tokens=len(splits["validation"]) * args.seq_len,
                 vocab=len(tokenizer), data_seconds=time.perf_counter() - t0)
    log(f"data: {facts}")

    config = tiny_llama_config(len(tokenizer), hidden_size=args.teacher_hidden, num_layers=args.teacher_layers,
                               num_heads=max(4, args.teacher_hidden // 64), num_kv_heads=4,
                               intermediate_size=int(2.67 * args.teacher_hidden), max_positions=args.seq_len)
    teacher = build_model(config, seed=0, lm_head_scale=1.0)
    facts["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    ids, labels = split_arrays(work, "train")
    val_ids, val_labels = split_arrays(work, "validation")
    gpu = args.device == "cuda"
    stats = pretrain(teacher, ids, labels, PretrainConfig(
        steps=args.teacher_steps, batch_size=32 if gpu else 16, lr=1.5e-3 if gpu else 3e-3, warmup=100 if gpu else 20,
        device=args.device, dtype=torch.bfloat16 if gpu else torch.float32))
    stats["val_ce"] = evaluate_lm(teacher, val_ids, val_labels, 16, args.device)
    facts["teacher"] = stats
    log(f"teacher: {stats}")
    save_model(teacher.float().cpu(), work / "teacher", tokenizer)
    del teacher
    if gpu:
        torch.cuda.empty_cache()

    for name, flags in cache_flags(args).items():
        start = time.perf_counter()
        vpmoe("cache-teacher", "--model", str(work / "teacher"), "--data", str(work / "data"), "--split", "train",
              "--out", str(work / f"cache_{name}"), "--backend", "hf", "--rows-per-shard", "1024",
              "--max-tokens-per-batch", "32768" if gpu else "4096", "--encode-threads", "8" if gpu else "2",
              "--no-progress", *(["--limit-rows", str(args.cache_rows)] if args.cache_rows else []), *flags)
        facts[f"cache_{name}_seconds"] = time.perf_counter() - start
    for seed in sorted({v[2] for v in VARIANTS.values()}):
        student = build_model(student_config(len(tokenizer), args), seed=100 + seed, lm_head_scale=1.0)
        facts["student_params"] = sum(p.numel() for p in student.parameters())
        save_model(student, work / f"student_init_{seed}", tokenizer)
    (work / "facts.json").write_text(json.dumps(facts, indent=1))


def student_config(vocab: int, args):
    return tiny_llama_config(vocab, hidden_size=args.student_hidden, num_layers=args.student_layers,
                             num_heads=max(2, args.student_hidden // 64), num_kv_heads=2,
                             intermediate_size=int(2.67 * args.student_hidden), max_positions=args.seq_len)


def train_config(work: Path, name: str, args) -> Path:
    cache, loss, seed = VARIANTS[name]
    if loss.get("hidden_cosine"):
        s_layers, t_layers = args.student_layers, args.teacher_layers
        loss = {**loss, "layer_pairs": [[s_layers // 2, t_layers // 2], [s_layers, t_layers]]}
    gpu = args.device == "cuda"
    run = work / "runs" / name
    config = {
        "student": {"path": str(work / f"student_init_{seed}"), "dtype": "fp32",
                    "compute_dtype": "bf16" if gpu else "fp32", "train": [], "freeze": []},
        "data": {"train_cache": str(work / f"cache_{cache}"), "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                 "global_batch": args.global_batch, "seed": seed, "num_threads": 6 if gpu else 1,
                 "prefetch": 8 if gpu else 2, "pin_memory": gpu},
        "loss": {"ce": 0.0, "kl": 0.0, "hidden_cosine": 0.0, "chunk_size": 1024 if gpu else 512, **loss},
        "optim": {"name": "adamw", "steps": args.steps, "lr": args.lr, "min_lr": args.lr / 10, "warmup_ratio": 0.05,
                  "weight_decay": 0.1, "grad_clip": 1.0},
        "checkpoint": {"dir": str(run / "checkpoints"), "every": 0, "keep": 1},
        "export": {"dir": str(run / "export")},
        "eval": {"every": 0},
        "log": {"every": 10, "jsonl": str(run / "log.jsonl")},
        "seed": seed,
        "device": args.device,
    }
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@torch.no_grad()
def heldout_metrics(model, teacher, val_ids, val_labels, device: str, batch: int = 16, bins: int = 15) -> dict:
    """Held-out CE, expected calibration error and top-1 agreement with the teacher."""
    ce_sum, count, agree = 0.0, 0, 0
    conf_all, correct_all = [], []
    for start in range(0, len(val_ids), batch):
        ids = torch.as_tensor(val_ids[start:start + batch], dtype=torch.long, device=device)
        lab = torch.as_tensor(val_labels[start:start + batch], dtype=torch.long, device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            s_logits = model(input_ids=ids).logits[:, :-1].float()
            t_logits = teacher(input_ids=ids).logits[:, :-1].float()
        target = lab[:, 1:]  # logits at t predict token t+1
        valid = target != IGNORE_INDEX
        ce_sum += F.cross_entropy(s_logits[valid], target[valid], reduction="sum").item()
        count += int(valid.sum())
        probs = s_logits[valid].softmax(-1)
        conf, pred = probs.max(-1)
        conf_all.append(conf.cpu())
        correct_all.append((pred == target[valid]).cpu())
        agree += int((pred == t_logits[valid].argmax(-1)).sum())
    conf, correct = torch.cat(conf_all), torch.cat(correct_all).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(conf[in_bin].mean().item() - correct[in_bin].mean().item())
    return {"heldout_ce": ce_sum / count, "ece": ece, "top1_agree": agree / count, "heldout_tokens": count}


def cache_bytes_per_token(cache_dir: Path) -> dict:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    totals = manifest["totals"]
    return {"bytes_per_token": totals["bytes"] / max(totals["tokens"], 1)}


def students(work: Path, args) -> None:
    from transformers import AutoModelForCausalLM

    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    teacher = AutoModelForCausalLM.from_pretrained(str(work / "teacher"), dtype=torch.float32).to(args.device).eval()
    val_ids, val_labels = split_arrays(work, "validation")
    for name in names:
        result_path = work / "runs" / name / "result.json"
        if result_path.exists():
            log(f"{name}: done already")
            continue
        config = train_config(work, name, args)
        start = time.perf_counter()
        vpmoe("train", str(config))
        seconds = time.perf_counter() - start
        records = [json.loads(x) for x in (work / "runs" / name / "log.jsonl").read_text().splitlines() if x.strip()]
        steps = [r for r in records if r.get("kind") == "train"]
        tps = float(np.median([r["tokens_per_s"] for r in steps[1:]])) if len(steps) > 1 else float("nan")
        model = AutoModelForCausalLM.from_pretrained(str(work / "runs" / name / "export"), dtype=torch.float32)
        metrics = heldout_metrics(model.to(args.device).eval(), teacher, val_ids, val_labels, args.device)
        cache = VARIANTS[name][0]
        result = {"variant": name, "cache": cache, **metrics, **cache_bytes_per_token(work / f"cache_{cache}"),
                  "train_tokens_per_s": tps, "train_seconds": seconds, "final_train_loss": steps[-1].get("loss")}
        log(f"{name}: {result}")
        result_path.write_text(json.dumps(result, indent=1))
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    report(work, args)


def report(work: Path, args) -> None:
    facts = json.loads((work / "facts.json").read_text())
    rows = [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*/result.json"))]
    order = {name: i for i, name in enumerate(VARIANTS)}
    rows.sort(key=lambda r: order.get(r["variant"], 99))
    lines = [f"teacher: {facts['teacher_params'] / 1e6:.2f}M params, held-out CE {facts['teacher']['val_ce']:.3f}; "
             f"student: {facts['student_params'] / 1e6:.2f}M params; train tokens {facts['train_tokens']:,}, "
             f"held-out tokens {facts['val_tokens']:,}, vocab {facts['vocab']}",
             "", "| variant | cache | held-out CE | ECE | top-1 agree | cache B/token | train tok/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['cache']} | {r['heldout_ce']:.4f} | {r['ece']:.4f} | "
                     f"{r['top1_agree']:.4f} | {r['bytes_per_token']:.1f} | {r['train_tokens_per_s']:,.0f} |")
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "proof_report.md").write_text(text + "\n")
        Path(os.environ["OUT"], "proof_results.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prepare", "students", "report"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/proof"))
    ap.add_argument("--corpus-mb", type=int, default=60)
    ap.add_argument("--train-rows", type=int, default=6000)
    ap.add_argument("--val-rows", type=int, default=300)
    ap.add_argument("--teacher-steps", type=int, default=1200)
    ap.add_argument("--cache-rows", type=int, default=0,
                    help="students train on the first N train rows (the teacher on all of them); 0: all")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--corpus-root", type=Path, help="default: installed packages (cuda) or the stdlib (cpu)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--teacher-hidden", type=int, default=768)
    ap.add_argument("--teacher-layers", type=int, default=12)
    ap.add_argument("--student-hidden", type=int, default=384)
    ap.add_argument("--student-layers", type=int, default=6)
    args = ap.parse_args()
    {"prepare": prepare, "students": students, "report": report}[args.step](args.work, args)


if __name__ == "__main__":
    main()

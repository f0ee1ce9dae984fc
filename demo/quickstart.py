"""The CPU quickstart: the whole pipeline on a built-in tiny teacher and real text.

Stages (each skipped on a rerun once its marker exists; cache-teacher and
train resume by themselves):
  data     Python stdlib sources -> BPE tokenizer -> save_to_disk dataset
  teacher  a small Llama-style teacher trained briefly on the train split
  cache    `vpmoe cache-teacher` (hf backend) over train and validation
  inspect  `vpmoe inspect-shard --verify --json`
  student  a smaller student initialised and saved
  train    `vpmoe train` on 2 gloo ranks: CE + KL + hidden cosine, eval, export
The commands run as subprocesses, exactly as a user on a GPU cluster runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_text


@dataclass(frozen=True)
class QuickstartSize:
    corpus_bytes: int
    vocab_size: int
    seq_len: int
    train_rows: int
    validation_rows: int
    teacher_hidden: int
    teacher_layers: int
    teacher_steps: int
    student_hidden: int
    student_layers: int
    train_steps: int
    global_batch: int
    eval_every: int


SIZES = {
    "default": QuickstartSize(corpus_bytes=3_000_000, vocab_size=2048, seq_len=128, train_rows=1536,
                              validation_rows=128, teacher_hidden=128, teacher_layers=4, teacher_steps=800,
                              student_hidden=96, student_layers=2, train_steps=120, global_batch=16,
                              eval_every=40),
    # CI: the same stages in well under a minute of compute.
    "ci": QuickstartSize(corpus_bytes=600_000, vocab_size=512, seq_len=64, train_rows=256, validation_rows=32,
                         teacher_hidden=64, teacher_layers=2, teacher_steps=80, student_hidden=48,
                         student_layers=2, train_steps=30, global_batch=8, eval_every=15),
}

TEACHER_HIDDEN_LAYER = 2  # the teacher layer cached for the hidden-cosine loss
STUDENT_HIDDEN_LAYER = 1  # its student counterpart
TOP_K = 16
TEMPERATURES = "1,2"


def log(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


class Stages:
    """Markers under OUT/.stages/<name>.json hold each finished stage's results."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / ".stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> dict | None:
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, name: str, result: dict) -> dict:
        atomic_write_text(self.dir / f"{name}.json", json.dumps(result, indent=1))
        return result


def vpmoe(*args: str, capture: bool = False) -> str:
    """Run a `vpmoe` subcommand in a subprocess (the user's own entry point)."""
    cmd = [sys.executable, "-m", "cli", *args]
    log("$ vpmoe " + " ".join(args))
    proc = subprocess.run(cmd, check=False, text=True, stdout=subprocess.PIPE if capture else None,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"`vpmoe {' '.join(args)}` failed with exit code {proc.returncode}")
    return proc.stdout or ""


def stage_data(out: Path, size: QuickstartSize) -> dict:
    from demo.tiny_corpus import build_dataset, interleave_by_source, read_split_sources
    from demo.tiny_models import train_bpe_tokenizer

    # id, source (the stdlib package) and spans (a synthetic analysis/final split) like the phase-1 data
    train_texts, validation_texts = read_split_sources(size.corpus_bytes)
    validation_texts = interleave_by_source(validation_texts)  # several sources in the few eval rows
    tokenizer = train_bpe_tokenizer([t.text for t in train_texts], size.vocab_size, out / "tokenizer")
    splits = build_dataset(out / "data", tokenizer, train_texts, validation_texts, size.seq_len,
                           size.train_rows, size.validation_rows)
    return {"train_files": len(train_texts), "validation_files": len(validation_texts),
            "sources": sorted(set(splits["train"]["source"][i]["dataset"] for i in range(len(splits["train"])))),
            "train_rows": len(splits["train"]), "validation_rows": len(splits["validation"]),
            "train_tokens": len(splits["train"]) * size.seq_len, "vocab_size": len(tokenizer)}


def _split_arrays(out: Path, split: str):
    from datasets import load_from_disk

    ds = load_from_disk(str(out / "data"))[split].with_format("numpy")
    return np.stack(ds["input_ids"]), np.stack(ds["labels"])


def _tiny_llama(vocab_size: int, hidden: int, layers: int, seq_len: int, seed: int):
    """The quickstart's teacher and student shape: a Llama-style model initialised for training."""
    from demo.tiny_models import build_model, tiny_llama_config

    config = tiny_llama_config(vocab_size, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                               intermediate_size=2 * hidden, max_positions=max(256, seq_len))
    return build_model(config, seed=seed, lm_head_scale=1.0)


def stage_teacher(out: Path, size: QuickstartSize, vocab_size: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from demo.pretrain import PretrainConfig, evaluate_lm, pretrain
    from demo.tiny_models import save_model

    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    model = _tiny_llama(vocab_size, size.teacher_hidden, size.teacher_layers, size.seq_len, seed=0)
    train_ids, train_labels = _split_arrays(out, "train")
    val_ids, val_labels = _split_arrays(out, "validation")
    stats = pretrain(model, train_ids, train_labels, PretrainConfig(steps=size.teacher_steps, batch_size=16))
    stats["validation_ce"] = evaluate_lm(model, val_ids, val_labels, 32, "cpu")
    save_model(model, out / "teacher", AutoTokenizer.from_pretrained(str(out / "tokenizer")))
    log(f"teacher: train loss {stats['first_loss']:.2f} -> {stats['final_loss']:.2f}, "
        f"validation CE {stats['validation_ce']:.3f} nats/token, {stats['tokens_per_s']:.0f} tokens/s")
    return stats


def stage_cache(out: Path, size: QuickstartSize) -> dict:
    results = {}
    for split in ("train", "validation"):
        start = time.perf_counter()
        vpmoe("cache-teacher", "--model", str(out / "teacher"), "--data", str(out / "data"), "--split", split,
              "--out", str(out / "cache" / split), "--backend", "hf", "--top-k", str(TOP_K),
              "--temperatures", TEMPERATURES, "--hidden-layers", str(TEACHER_HIDDEN_LAYER),
              "--hidden-dtype", "bf16", "--rows-per-shard", "256")
        results[split] = {"seconds": time.perf_counter() - start}
    return results


def stage_inspect(out: Path) -> dict:
    report = json.loads(vpmoe("inspect-shard", str(out / "cache" / "train"), "--verify", "--json", capture=True))
    return report


def stage_student(out: Path, size: QuickstartSize, vocab_size: int) -> dict:
    from transformers import AutoTokenizer

    from demo.tiny_models import save_model

    model = _tiny_llama(vocab_size, size.student_hidden, size.student_layers, size.seq_len, seed=1)
    save_model(model, out / "student-init", AutoTokenizer.from_pretrained(str(out / "tokenizer")))
    return {"parameters": sum(p.numel() for p in model.parameters())}


def write_train_config(out: Path, size: QuickstartSize) -> Path:
    """The tiny CPU config with this run's paths and sizes."""
    from student_train.config import load_config, save_config

    overrides = [
        f"student.path={out / 'student-init'}",
        f"data.train_cache={out / 'cache' / 'train'}",
        f"data.eval_cache={out / 'cache' / 'validation'}",
        f"data.seq_len={size.seq_len}",
        f"data.global_batch={size.global_batch}",
        f"optim.steps={size.train_steps}",
        f"eval.every={size.eval_every}",
        f"checkpoint.dir={out / 'run' / 'checkpoints'}",
        f"checkpoint.every={size.eval_every}",
        f"log.jsonl={out / 'run' / 'log.jsonl'}",
        f"export.dir={out / 'run' / 'export'}",
        f"loss.layer_pairs=[[{STUDENT_HIDDEN_LAYER},{TEACHER_HIDDEN_LAYER}]]",
    ]
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml", overrides)
    path = out / "train.yaml"
    save_config(config, path)
    return path


def stage_train(out: Path, size: QuickstartSize) -> dict:
    config_path = write_train_config(out, size)
    start = time.perf_counter()
    vpmoe("train", str(config_path), "--nproc-per-node", "2", "--resume")
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if r.get("kind") == "eval"]
    steps = [r for r in records if r.get("kind") == "train"]
    return {"seconds": seconds, "eval_first": evals[0] if evals else None, "eval_last": evals[-1] if evals else None,
            "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in steps[1:]])) if len(steps) > 1 else None}


def check_export(out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "run" / "export"))
    return {"export_loads": True, "export_parameters": sum(p.numel() for p in model.parameters())}


def run_quickstart(out: Path, size_name: str = "default") -> dict:
    if size_name not in SIZES:
        raise ValueError(f"unknown quickstart size {size_name!r}; choose one of {sorted(SIZES)}")
    size = SIZES[size_name]
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)

    def stage(name, fn, *args):
        done = stages.done(name)
        if done is not None:
            log(f"{name}: already done, skipping")
            return done
        log(f"{name}: running")
        return stages.finish(name, fn(*args))

    data = stage("data", stage_data, out, size)
    teacher = stage("teacher", stage_teacher, out, size, data["vocab_size"])
    cache = stage("cache", stage_cache, out, size)
    inspect = stage("inspect", stage_inspect, out)
    stage("student", stage_student, out, size, data["vocab_size"])
    train = stage("train", stage_train, out, size)
    export = stage("export", check_export, out)
    summary = {"size": asdict(size), "data": data, "teacher": teacher, "cache": cache,
               "inspect": inspect, "train": train, "export": export}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary

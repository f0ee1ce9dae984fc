"""Proof on real text (issue 17): does distillation from the cache beat plain training, and what
does each target kind lose against full KD? (docs/BENCHMARKS.md, "Distillation quality")

Every cached variant runs through the product's own commands (`vpmoe cache-teacher`,
`vpmoe train`); full KD, the ceiling, runs the product's trainer too, with the teacher beside
the student supplying its exact last-layer state for every position (`kl_mode: dense` against the
teacher's own head), so it differs from the `dense` row only in where that state comes from.

    python bench/proof_distill.py run --work /tmp/proof --results docs/results/DATE-proof   # everything
    python bench/proof_distill.py prepare --stages data,teacher ...  # or step by step: data, teacher,
    python bench/proof_distill.py prepare --stages caches,inits ...  #   caches, student inits,
    python bench/proof_distill.py students --variants ce,tail_k64 ... #   students,
    python bench/proof_distill.py report --results ...               #   the markdown table

`--preset h200` (default) is the issue's scale for one H200; `run --preset cpu --seeds 0` is a
smoke run of a few minutes on 2 cores (one seed per variant). Any size flag overrides its
preset value. Every student of one seed has the same initial weights and, reading the same rows
in caches of the same layout, the same data order (the loader's plan depends on row count,
lengths and seed only).

Resuming: the work directory holds what is large (data, teacher, caches, runs); the results
directory holds what is kept (setup.json: token counts, the teacher's metrics and sha256;
caches.json; runs/<variant>.seed<N>.json) and is small enough to commit. A rerun skips every
stage and student whose recorded settings equal the current ones, and refuses (naming the file
and the differing keys) a result made with other settings or another teacher, so results of
two teachers are never mixed. A fresh machine rebuilds data and teacher; only a teacher with
the recorded sha256 lets earlier students stand.

Corpus: Python sources of the installed packages (GPU) or the standard library (CPU), split
by file into train and held-out; a byte-level BPE trained on the train split.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.atomic import atomic_write_text  # noqa: E402
from common.causal_lm import IGNORE_INDEX, capture_block_outputs, decoder_layers  # noqa: E402
from common.manifest import file_sha256  # noqa: E402
from demo.pretrain import PretrainConfig, evaluate_lm, pretrain  # noqa: E402
from demo.tiny_corpus import read_split_texts, tokenize_rows  # noqa: E402
from demo.tiny_models import build_model, save_model, tiny_llama_config, train_bpe_tokenizer  # noqa: E402


@dataclass(frozen=True)
class Scale:
    """Everything that sizes the experiment; part of every result's recorded settings."""

    device: str
    corpus_mb: int  # source bytes read (millions)
    vocab: int
    seq_len: int
    train_rows: int  # 0: every row the corpus gives
    val_rows: int
    teacher_hidden: int
    teacher_layers: int
    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    cache_rows: int  # students train on (and the caches hold) the first N train rows
    student_hidden: int
    student_layers: int
    steps: int
    global_batch: int
    micro_batch: int
    lr: float


PRESETS = {
    # Teacher 12 x 768 (~125M parameters at 32k), students 6 x 384 (~34M); ~400 MB of source give
    # ~100M train tokens; the teacher sees 1,000 x 64 x 1,024 = 65.5M (under one epoch), each student
    # 8,192 rows = 8.4M tokens once (256 steps x 32 rows); 512 held-out rows (524k tokens, 393k predicted).
    "h200": Scale(device="cuda", corpus_mb=400, vocab=32000, seq_len=1024, train_rows=0, val_rows=512,
                  teacher_hidden=768, teacher_layers=12, teacher_steps=1000, teacher_batch=64, teacher_lr=1.5e-3,
                  cache_rows=8192, student_hidden=384, student_layers=6, steps=256, global_batch=32,
                  micro_batch=32, lr=2e-3),
    # A smoke run on 2 cores (with --seeds 0: 8.4 minutes on cores shared with other work): teacher 4 x 128 (1.0M parameters),
    # students 2 x 64 (0.23M), each student 16 x 16 x 128 = 33k tokens; the teacher 150 x 16 x 128 = 307k.
    "cpu": Scale(device="cpu", corpus_mb=8, vocab=1024, seq_len=128, train_rows=8000, val_rows=120,
                 teacher_hidden=128, teacher_layers=4, teacher_steps=150, teacher_batch=16, teacher_lr=3e-3,
                 cache_rows=256, student_hidden=64, student_layers=2, steps=16, global_batch=16, micro_batch=16,
                 lr=3e-3),
}


def cache_flags(scale: Scale) -> dict[str, list[str]]:
    """Each cache's `vpmoe cache-teacher` settings; all hold the same first `cache_rows` rows."""
    hidden = f"{scale.teacher_layers // 2},{scale.teacher_layers}"  # for the production mix's hidden cosine
    return {
        "k8": ["--top-k", "8", "--temperatures", "1,2"],
        "k64": ["--top-k", "64", "--temperatures", "1,2", "--hidden-layers", hidden, "--hidden-dtype", "fp8",
                "--hidden-token-fraction", "0.25"],
        "sampled12": ["--sampled", "12"],
        "sampled50": ["--sampled", "50"],
        # Every position's last-layer state in fp8; the top-8 is the (here unused) fallback's.
        "dense": ["--top-k", "8", "--temperatures", "1", "--dense-from-last-layer", "--hidden-dtype", "fp8",
                  "--hidden-token-fraction", "1.0"],
    }


KL_T1 = dict(ce=0.0, kl=1.0, kl_temperature=1.0)
SEEDS_3 = (0, 1, 2)
# name: (cache, loss settings, seeds). A seed picks the student's initial weights and the data order.
VARIANTS = {
    "ce": ("k8", dict(ce=1.0, kl=0.0), SEEDS_3),  # reads only the tokens of the smallest cache
    "tail_k8": ("k8", dict(KL_T1, kl_mode="tail"), (0,)),
    "tail_k64": ("k64", dict(KL_T1, kl_mode="tail"), SEEDS_3),
    "renorm_k8": ("k8", dict(KL_T1, kl_mode="renorm"), (0,)),  # the study's small-k case
    "renorm_k64": ("k64", dict(KL_T1, kl_mode="renorm"), (0,)),
    "sampled_n12": ("sampled12", dict(KL_T1, kl_mode="sampled"), (0,)),
    "sampled_n50": ("sampled50", dict(KL_T1, kl_mode="sampled"), SEEDS_3),
    # the production mix; layer pairs from the sizes: student (S/2, S) <- teacher (T/2, T)
    "mix": ("k64", dict(ce=0.2, kl=0.2, kl_mode="tail", kl_temperature=2.0, hidden_cosine=0.6), SEEDS_3),
    "dense": ("dense", dict(KL_T1, kl_mode="dense"), (0,)),
    "full_kd": ("dense", dict(KL_T1, kl_mode="dense"), (0,)),  # the teacher online (full_kd_train)
}
ONLINE = {"full_kd"}


def log(msg: str) -> None:
    print(f"[proof {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def vpmoe(*args: str) -> None:
    log("$ vpmoe " + " ".join(args))
    subprocess.run([sys.executable, "-m", "cli", *args], check=True, cwd=ROOT, env=child_env())


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def differing_keys(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


def check_same(path: Path, recorded: dict, current: dict) -> None:
    """ValueError naming `path` when a kept result was made with other settings."""
    diff = differing_keys(recorded, current)
    if diff:
        raise ValueError(f"{path}: made with other settings ({'; '.join(diff[:6])}); move it aside to redo it, "
                         "or rerun with the settings it records")


# ------------------------------------------------------------------ prepare


def data_settings(scale: Scale, corpus_root: Path) -> dict:
    return dict(corpus_root=str(corpus_root), corpus_mb=scale.corpus_mb, vocab=scale.vocab, seq_len=scale.seq_len,
                train_rows=scale.train_rows, val_rows=scale.val_rows)


def teacher_settings(scale: Scale) -> dict:
    settings = {k: getattr(scale, k) for k in ("teacher_hidden", "teacher_layers", "teacher_steps", "teacher_batch",
                                               "teacher_lr", "device")}
    if scale.device == "cuda":
        settings["attention"] = "math"  # deterministic backward (prepare_teacher)
    return settings


def list_column(rows_RL: np.ndarray) -> pa.ListArray:
    """Equal-length rows as a list<int32> column (what `cache-teacher --data` reads), built from
    offsets and one flat array."""
    offsets = np.arange(0, rows_RL.size + 1, rows_RL.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows_RL.reshape(-1)))


def split_arrays(work: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) [rows, seq_len] of one split."""
    table = pq.read_table(work / "data" / f"{split}.parquet")
    return tuple(np.asarray(table.column(name).combine_chunks().flatten()).reshape(table.num_rows, -1)
                 for name in ("input_ids", "labels"))


def data_sha256(work: Path) -> str:
    h = hashlib.sha256()
    for split in ("train", "validation"):
        for array in split_arrays(work, split):
            h.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    h.update((work / "tokenizer" / "tokenizer.json").read_bytes())
    return h.hexdigest()


def prepare_data(work: Path, scale: Scale, corpus_root: Path, setup: dict) -> None:
    """Corpus, tokenizer and rows as `<split>.parquet` (no `datasets`: the GPU image lacks it)."""
    settings = data_settings(scale, corpus_root)
    if not (work / "data" / "facts.json").exists():  # written last: a stage cut off starts over
        start = time.perf_counter()
        train_texts, val_texts = read_split_texts(scale.corpus_mb * 10**6, validation_fraction=0.05, root=corpus_root)
        tokenizer = train_bpe_tokenizer(train_texts[: max(1, len(train_texts) // 2)], scale.vocab, work / "tokenizer")
        (work / "data").mkdir(parents=True, exist_ok=True)
        for split, texts, rows in (("train", train_texts, scale.train_rows), ("validation", val_texts, scale.val_rows)):
            columns = tokenize_rows(texts, tokenizer, scale.seq_len, rows or None)
            table = pa.table({name: list_column(np.asarray(columns[name], dtype=np.int32))
                              for name in ("input_ids", "labels")})
            pq.write_table(table, work / "data" / f"{split}.parquet")
        facts = dict(train_files=len(train_texts), val_files=len(val_texts), data_seconds=time.perf_counter() - start)
        (work / "data" / "facts.json").write_text(json.dumps(facts))
    facts = json.loads((work / "data" / "facts.json").read_text())
    ids, _ = split_arrays(work, "train")
    val_ids, val_labels = split_arrays(work, "validation")
    facts.update(vocab=scale.vocab, train_rows=len(ids), train_tokens=int(ids.size),
                 heldout_rows=len(val_ids), heldout_tokens=int(val_ids.size),
                 heldout_predicted_tokens=int((val_labels[:, 1:] != IGNORE_INDEX).sum()),
                 data_sha256=data_sha256(work))
    agree_or_record(setup, "data", settings, facts, ("data_sha256",))
    log(f"data: {facts}")


def agree_or_record(setup: dict, key: str, settings: dict, facts: dict, identity: tuple[str, ...]) -> None:
    """Records a stage in setup.json, or checks that what this machine built is what was recorded
    (the identity keys: a rebuilt corpus or teacher must hash the same for kept results to stand)."""
    kept = setup.get(key)
    if kept is not None:
        check_same(setup["_path"], kept["settings"], settings)
        mismatch = [k for k in identity if kept["facts"][k] != facts[k]]
        if mismatch:
            raise ValueError(f"{setup['_path']}: the {key} built here differs from the recorded one "
                             f"({', '.join(mismatch)}); results made with it cannot be mixed with new ones: "
                             "move the results directory aside to start over")
        facts = {**kept["facts"], **facts}
    setup[key] = dict(settings=settings, facts=facts)
    write_json(setup["_path"], {k: v for k, v in setup.items() if k != "_path"})


def teacher_config(scale: Scale):
    return tiny_llama_config(scale.vocab, hidden_size=scale.teacher_hidden, num_layers=scale.teacher_layers,
                             num_heads=max(4, scale.teacher_hidden // 64), num_kv_heads=4,
                             intermediate_size=int(2.67 * scale.teacher_hidden), max_positions=scale.seq_len)


def student_config(scale: Scale):
    return tiny_llama_config(scale.vocab, hidden_size=scale.student_hidden, num_layers=scale.student_layers,
                             num_heads=max(2, scale.student_hidden // 64), num_kv_heads=2,
                             intermediate_size=int(2.67 * scale.student_hidden), max_positions=scale.seq_len)


def log_teacher_step(step: int, loss: float) -> None:
    if step % 100 == 0:
        log(f"teacher step {step}: loss {loss:.3f}")


def prepare_teacher(work: Path, scale: Scale, setup: dict) -> None:
    from transformers import AutoTokenizer

    gpu = scale.device == "cuda"
    weights = work / "teacher" / "model.safetensors"
    facts = {}
    if not weights.exists():
        if gpu:  # the same teacher again on a fresh machine, so kept students stay valid (checked by sha256)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        teacher = build_model(teacher_config(scale), seed=0, lm_head_scale=1.0)
        ids, labels = split_arrays(work, "train")
        val_ids, val_labels = split_arrays(work, "validation")
        # The fused attention kernels' backward passes are not deterministic (cuDNN's, flash's and the
        # memory-efficient one's, outside strict mode); the plain math one is.
        # A teacher cut off by a call's time limit continues from its last saved state in the next
        # call on the same machine, with the weights an uncut run would have had.
        partial = work / "teacher-partial"
        with sdpa_kernel(SDPBackend.MATH) if gpu else contextlib.nullcontext():
            stats = pretrain(teacher, ids, labels, PretrainConfig(
                steps=scale.teacher_steps, batch_size=scale.teacher_batch, lr=scale.teacher_lr,
                warmup=max(1, scale.teacher_steps // 15), device=scale.device,
                dtype=torch.bfloat16 if gpu else torch.float32),
                state_dir=partial, save_every=max(1, scale.teacher_steps // 5), progress=log_teacher_step)
        stats["heldout_ce"] = evaluate_lm(teacher, val_ids, val_labels, 16, scale.device)
        stats["params"] = sum(p.numel() for p in teacher.parameters())
        save_model(teacher.float().cpu(), work / "teacher", AutoTokenizer.from_pretrained(str(work / "tokenizer")))
        (work / "teacher" / "training.json").write_text(json.dumps(stats))
        shutil.rmtree(partial, ignore_errors=True)
        del teacher
        if gpu:
            torch.cuda.empty_cache()
    facts = json.loads((work / "teacher" / "training.json").read_text())
    facts["teacher_sha256"] = file_sha256(weights)
    agree_or_record(setup, "teacher", teacher_settings(scale), facts, ("teacher_sha256",))
    log(f"teacher: {facts}")


def needed_caches(names: list[str]) -> list[str]:
    return sorted({VARIANTS[name][0] for name in names})


def prepare_caches(work: Path, scale: Scale, names: list[str], results: Path) -> None:
    """`vpmoe cache-teacher` per cache; a rerun of a finished cache verifies its shards and skips them."""
    gpu = scale.device == "cuda"
    kept_path = results / "caches.json"
    kept = read_json(kept_path) or {}
    for name in needed_caches(names):
        flags = cache_flags(scale)[name]
        settings = dict(flags=flags, rows=scale.cache_rows)
        out = work / f"cache_{name}"
        start = time.perf_counter()
        vpmoe("cache-teacher", "--model", str(work / "teacher"), "--data", str(work / "data"), "--split", "train",
              "--out", str(out), "--backend", "hf", "--device", scale.device, "--rows-per-shard", "512",
              "--max-tokens-per-batch", "65536" if gpu else "4096", "--encode-threads", "8" if gpu else "2",
              "--limit-rows", str(scale.cache_rows), "--no-progress", *flags)
        seconds = time.perf_counter() - start
        totals = json.loads((out / "manifest.json").read_text())["totals"]
        facts = dict(bytes_per_token=totals["bytes"] / max(totals["tokens"], 1), tokens=totals["tokens"])
        if name in kept:
            check_same(kept_path, kept[name]["settings"], settings)
        else:
            facts["seconds"] = seconds  # the first, full write (a rerun only verifies)
        kept[name] = dict(settings=settings, facts={**kept.get(name, {}).get("facts", {}), **facts})
        write_json(kept_path, kept)


def prepare_inits(work: Path, scale: Scale, names: list[str]) -> None:
    """One saved initial student per seed: every variant of a seed starts from the same weights."""
    from transformers import AutoTokenizer

    for seed in sorted({s for name in names for s in VARIANTS[name][2]}):
        if not (work / f"student_init_{seed}" / "model.safetensors").exists():
            student = build_model(student_config(scale), seed=100 + seed, lm_head_scale=1.0)
            save_model(student, work / f"student_init_{seed}", AutoTokenizer.from_pretrained(str(work / "tokenizer")))


def load_setup(results: Path) -> dict:
    path = results / "setup.json"
    return {**(read_json(path) or {}), "_path": path}


def prepare(work: Path, results: Path, scale: Scale, args) -> None:
    work.mkdir(parents=True, exist_ok=True)
    root = Path(args.corpus_root or sysconfig.get_paths()["purelib" if scale.device == "cuda" else "stdlib"])
    setup = load_setup(results)
    stages = args.stages.split(",")
    names = variant_names(args.variants)
    if "data" in stages:
        prepare_data(work, scale, root, setup)
    if "teacher" in stages:
        prepare_teacher(work, scale, setup)
    if "caches" in stages:
        prepare_caches(work, scale, names, results)
    if "inits" in stages:
        prepare_inits(work, scale, names)


# ------------------------------------------------------------------ students


def variant_names(spec: str) -> list[str]:
    names = list(VARIANTS) if spec == "all" else spec.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
    return names


def run_settings(scale: Scale, name: str, seed: int, setup: dict, caches: dict) -> dict:
    cache, loss, _ = VARIANTS[name]
    return dict(variant=name, seed=seed, online_teacher=name in ONLINE, loss=loss, cache=cache,
                cache_settings=caches[cache]["settings"], scale=dataclasses.asdict(scale),
                data_sha256=setup["data"]["facts"]["data_sha256"],
                teacher_sha256=setup["teacher"]["facts"]["teacher_sha256"])


def train_config(work: Path, run: Path, name: str, seed: int, scale: Scale) -> Path:
    cache, loss, _ = VARIANTS[name]
    if loss.get("hidden_cosine"):
        s_layers, t_layers = scale.student_layers, scale.teacher_layers
        loss = {**loss, "layer_pairs": [[s_layers // 2, t_layers // 2], [s_layers, t_layers]]}
    gpu = scale.device == "cuda"
    config = {
        "student": {"path": str(work / f"student_init_{seed}"), "dtype": "fp32",
                    "compute_dtype": "bf16" if gpu else "fp32", "train": [], "freeze": []},
        "data": {"train_cache": str(work / f"cache_{cache}"), "seq_len": scale.seq_len,
                 "micro_batch": scale.micro_batch, "global_batch": scale.global_batch, "seed": seed,
                 "num_threads": 6 if gpu else 1, "prefetch": 8 if gpu else 2, "pin_memory": gpu},
        "loss": {"ce": 0.0, "kl": 0.0, "hidden_cosine": 0.0, "chunk_size": 1024 if gpu else 512, **loss},
        "optim": {"name": "adamw", "steps": scale.steps, "lr": scale.lr, "min_lr": scale.lr / 10,
                  "warmup_ratio": 0.05, "weight_decay": 0.1, "grad_clip": 1.0},
        "checkpoint": {"dir": str(run / "checkpoints"), "every": 0, "keep": 1},
        "export": {"dir": str(run / "export")},
        "eval": {"every": 0},
        "log": {"every": 10, "jsonl": str(run / "log.jsonl")},
        "seed": seed,
        "device": scale.device,
    }
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class OnlineTeacherBatches:
    """The train loader's batches with the dense layer's state replaced by the teacher's own,
    computed now for every position: `kl_mode: dense` then is exact full KD. Everything else
    (checkpoint state, close) is the wrapped loader's."""

    def __init__(self, loader, teacher, layer: int, device: torch.device, compute_dtype: torch.dtype):
        self.loader, self.teacher, self.layer = loader, teacher, layer
        self.device, self.compute_dtype = device, compute_dtype
        self.captured: dict[int, torch.Tensor] = {}
        capture_block_outputs(decoder_layers(teacher), [layer], self.captured)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            yield self.with_teacher_state(batch)

    @torch.no_grad()
    def with_teacher_state(self, batch):
        assert batch.position_ids_BL is None, "the online teacher takes unpacked rows"
        ids_BL = batch.input_ids_BL.to(self.device)
        mask_BL = batch.attention_mask_BL.to(self.device)
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            self.teacher(input_ids=ids_BL, attention_mask=mask_BL)
        hidden_BLE = self.captured.pop(self.layer).float()
        scales = {k: v for k, v in batch.teacher_hidden_scale.items() if k != self.layer}
        return dataclasses.replace(batch, teacher_hidden={**batch.teacher_hidden, self.layer: hidden_BLE},
                                   teacher_hidden_scale=scales, hidden_mask_BL=batch.attention_mask_BL.bool())


def full_kd_train(config_path: Path, teacher_dir: Path) -> None:
    """`vpmoe train` of one config, its dense targets from the teacher online (see OnlineTeacherBatches)."""
    from transformers import AutoModelForCausalLM

    from common.causal_lm import TORCH_DTYPES
    from student_train import parallel
    from student_train.config import load_config
    from student_train.trainer import Trainer

    cfg = load_config(config_path)
    trainer, clean = Trainer(cfg), False
    try:
        device = trainer.env.device
        teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32, use_safetensors=True)
        compute = TORCH_DTYPES[cfg.student.compute_dtype] if device.type == "cuda" else torch.float32
        trainer.train_loader = OnlineTeacherBatches(trainer.train_loader, teacher.to(device).eval(),
                                                    trainer.dense.layer, device, compute)
        summary = trainer.train()
        clean = True
        print(f"done: {summary.steps} steps, {summary.tokens:,} tokens, {summary.tokens_per_s:,.0f} tokens/s")
    finally:
        trainer.close()
        parallel.shutdown(clean)


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
        conf, pred = s_logits[valid].softmax(-1).max(-1)
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


def students(work: Path, results: Path, scale: Scale, args) -> None:
    from transformers import AutoModelForCausalLM

    setup = load_setup(results)
    caches = read_json(results / "caches.json") or {}
    if "teacher" not in setup or "data" not in setup:
        raise ValueError(f"{results / 'setup.json'}: no data or teacher recorded yet; run `prepare` first")
    teacher_sha = file_sha256(work / "teacher" / "model.safetensors")
    if teacher_sha != setup["teacher"]["facts"]["teacher_sha256"]:
        raise ValueError(f"{work / 'teacher'}: not the teacher {results / 'setup.json'} records (sha256 "
                         f"{teacher_sha[:12]}...); run `prepare` for this work directory")
    names = variant_names(args.variants)
    missing = [c for c in needed_caches(names) if c not in caches]
    if missing:
        raise ValueError(f"{results / 'caches.json'}: no cache {', '.join(missing)} yet; run `prepare` with these "
                         "--variants first")
    started = time.perf_counter()
    teacher = None
    # Seed 0 of every variant first: a whole table before the repeats that give the spread.
    order = sorted((seed, i, name) for i, name in enumerate(names) for seed in VARIANTS[name][2]
                   if args.seeds is None or seed in args.seeds)
    index, count = args.shard
    # One process per GPU, each its own slice of the runs; each run's result is its own file.
    for seed, _, name in order[index::count]:
        run_name = f"{name}.seed{seed}"
        result_path = results / "runs" / f"{run_name}.json"
        settings = run_settings(scale, name, seed, setup, caches)
        kept = read_json(result_path)
        if kept is not None:
            check_same(result_path, kept["settings"], settings)
            log(f"{run_name}: done already (same settings, same teacher)")
            continue
        if args.stop_after_minutes and time.perf_counter() - started > 60 * args.stop_after_minutes:
            log(f"{args.stop_after_minutes} minutes gone: {run_name} and later runs are left for the next command")
            break
        run = work / "runs" / run_name
        shutil.rmtree(run, ignore_errors=True)  # a run cut off earlier starts over
        config = train_config(work, run, name, seed, scale)
        start = time.perf_counter()
        if name in ONLINE:
            log(f"$ full-kd-train {config}")
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "full-kd-train", "--config",
                            str(config), "--work", str(work)], check=True, cwd=ROOT, env=child_env())
        else:
            vpmoe("train", str(config))
        seconds = time.perf_counter() - start
        records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
        steps = [r for r in records if r.get("kind") == "train"]
        timed = steps[1:] or steps  # the first logged interval holds the start-up
        summary = next(r for r in records if r.get("kind") == "summary")
        if teacher is None:
            teacher = AutoModelForCausalLM.from_pretrained(str(work / "teacher"), dtype=torch.float32,
                                                           use_safetensors=True).to(scale.device).eval()
            val_ids, val_labels = split_arrays(work, "validation")
        model = AutoModelForCausalLM.from_pretrained(str(run / "export"), dtype=torch.float32, use_safetensors=True)
        metrics = heldout_metrics(model.to(scale.device).eval(), teacher, val_ids, val_labels, scale.device)
        result = dict(settings=settings, run=run_name, **metrics,
                      train_tokens_per_s=float(np.median([r["tokens_per_s"] for r in timed])),
                      train_seconds=seconds, train_tokens=summary["tokens"],
                      final_train_loss=steps[-1].get("loss"))
        log(f"{run_name}: {json.dumps({k: v for k, v in result.items() if k != 'settings'})}")
        write_json(result_path, result)
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # the export is what the metrics read
        del model
        if scale.device == "cuda":
            torch.cuda.empty_cache()
    report(work, results, scale, args)


# ------------------------------------------------------------------ report


def report(work: Path, results: Path, scale: Scale, args) -> str:
    setup = read_json(results / "setup.json")
    caches = read_json(results / "caches.json") or {}
    runs: dict[str, list[dict]] = {}
    for path in sorted((results / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        runs.setdefault(r["settings"]["variant"], []).append(r)
    data, teacher = setup["data"]["facts"], setup["teacher"]["facts"]
    kd = runs.get("full_kd")
    kd_ce = float(np.mean([r["heldout_ce"] for r in kd])) if kd else None
    first = next(iter(runs.values()))[0]["settings"]["scale"] if runs else dataclasses.asdict(scale)
    student_tokens = first["steps"] * first["global_batch"] * first["seq_len"]
    lines = [
        f"corpus: {data['train_files']:,} train / {data['val_files']:,} held-out files; vocab {data['vocab']:,}; "
        f"train split {data['train_tokens']:,} tokens, held-out {data['heldout_tokens']:,} "
        f"({data['heldout_predicted_tokens']:,} predicted)",
        f"teacher: {teacher['params'] / 1e6:.1f}M params, {teacher['tokens']:,} training tokens, "
        f"held-out CE {teacher['heldout_ce']:.4f}, {teacher['tokens_per_s']:,.0f} tok/s training",
        f"students: {first['student_layers']} x {first['student_hidden']}, {first['steps']} steps x "
        f"{first['global_batch']} rows x {first['seq_len']} = {student_tokens:,} tokens "
        f"(cached rows {first['cache_rows']:,})",
        "",
        "| variant | cache | seeds | held-out CE (mean ± half range) | ECE | top-1 agree | cache B/token | "
        "train tok/s | gap to full KD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        rows = runs.get(name)
        if not rows:
            continue
        ce = np.array([r["heldout_ce"] for r in rows])
        spread = f" ± {(ce.max() - ce.min()) / 2:.4f}" if len(rows) > 1 else ""
        cache = VARIANTS[name][0]
        if name == "ce":
            cache_cell, bytes_cell = "tokens only", "-"
        elif name in ONLINE:
            cache_cell, bytes_cell = "teacher online", "-"
        else:
            cache_cell, bytes_cell = cache, f"{caches[cache]['facts']['bytes_per_token']:.1f}"
        gap = f"{ce.mean() - kd_ce:+.4f}" if kd_ce is not None else "-"
        lines.append(f"| {name} | {cache_cell} | {len(rows)} | {ce.mean():.4f}{spread} | "
                     f"{np.mean([r['ece'] for r in rows]):.4f} | {np.mean([r['top1_agree'] for r in rows]):.4f} | "
                     f"{bytes_cell} | {np.median([r['train_tokens_per_s'] for r in rows]):,.0f} | {gap} |")
    text = "\n".join(lines)
    print(text)
    (results / "report.md").write_text(text + "\n")
    return text


# ------------------------------------------------------------------ command line


def scale_from(args) -> Scale:
    preset = PRESETS[args.preset]
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Scale) if getattr(args, f.name) is not None}
    return dataclasses.replace(preset, **given)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard: expected I/N, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard: I must be in 0..N-1, got {text!r}")
    return index, count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["run", "prepare", "students", "report", "full-kd-train"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/proof"), help="data, teacher, caches, runs")
    ap.add_argument("--results", type=Path, help="kept results (commit them); default WORK/results")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="h200")
    ap.add_argument("--variants", default="all", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=lambda v: {int(x) for x in v.split(",")},
                    help="students: only these seeds (e.g. 0: one run per variant); default: each variant's own")
    ap.add_argument("--stages", default="data,teacher,caches,inits", help="prepare: which stages")
    ap.add_argument("--shard", type=parse_shard, default=(0, 1),
                    help="students: I/N runs every N-th run from the I-th (one process per GPU, I = 0..N-1)")
    ap.add_argument("--stop-after-minutes", type=float, default=0,
                    help="students: start no run after this many minutes (keeps a command inside its limit)")
    ap.add_argument("--corpus-root", type=Path, help="default: installed packages (cuda) or the stdlib (cpu)")
    ap.add_argument("--config", type=Path, help="full-kd-train: the run's config")
    for f in dataclasses.fields(Scale):
        kind = {"int": int, "float": float, "str": str}[f.type]
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, help="default: the preset's")
    args = ap.parse_args()
    results = args.results or args.work / "results"
    if args.step == "full-kd-train":
        return full_kd_train(args.config, args.work / "teacher")
    scale = scale_from(args)
    try:
        if args.step in ("run", "prepare"):
            prepare(args.work, results, scale, args)
        if args.step in ("run", "students"):
            students(args.work, results, scale, args)
        if args.step == "report":
            report(args.work, results, scale, args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""`vpmoe train`: wires the components together and owns the step loop.

One optimizer step: fetch this rank's `grad_accum` micro batches, all-reduce
the count of valid target tokens (and hidden positions) over ranks and micro
batches, then forward/backward each micro batch with its loss divided by those
global counts, so the summed gradient is the gradient of the global
token-average whatever the split over ranks and micro batches. FSDP2 is told
not to divide gradients by the world size for the same reason.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from common.causal_lm import TORCH_DTYPES, decoder_layers
from common.gil import shorten_switch_interval
from common.manifest import load_manifest
from common.spec import ShardSpec
from common.teacher_head import TeacherHeadRecord, load_teacher_head
from student_train import parallel, run_lock
from student_train.checkpoint import Checkpointer, export_hf, resolve_resume, step_dir_name
from student_train.config import TrainConfig, grad_accum_steps
from student_train.evaluate import check_eval_teacher, evaluate, summarise
from student_train.loader import CacheLoader, LoaderConfig
from student_train.losses import weighted_valid_tokens
from student_train.metrics import MetricsLogger, Throughput, flops_model, mfu, peak_memory_gib
from student_train.model import (
    DistillModel,
    LossSums,
    TargetLayout,
    cast_trained,
    check_cache_fits,
    dense_head_record,
    load_student,
    select_trainable,
)
from student_train.optim import build_optimizer, build_scheduler
from student_train.packing import check_packed_attention
from student_train.parallel import DistEnv, ParallelConfig, all_reduce_sum, print0


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm; the step was not applied."""


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    seconds: float  # wall time, evals and checkpoints included
    tokens_per_s: float  # over step time
    tokens_per_s_per_device: float
    mfu: float | None
    peak_mem_gib: float
    cost_per_mtok: float | None
    stopped_early: bool
    last_checkpoint: str | None
    export_dir: str | None


def loader_config(cfg: TrainConfig, cache_dir: str, for_eval: bool, hidden_layers: tuple[int, ...]) -> LoaderConfig:
    d = cfg.data
    settings = d.settings()
    if for_eval:  # eval reads the first rows in cache order, at its own micro batch, in threads
        settings.update(micro_batch=cfg.eval.micro_batch or d.micro_batch, shuffle=False, decode_processes=0)
    return LoaderConfig(
        cache_dir=cache_dir, hidden_layers=hidden_layers, pin_memory=d.pin_memory and torch.cuda.is_available(),
        max_samples=(cfg.eval.samples or None) if for_eval else (d.max_samples or None), **settings)


def build_student(cfg: TrainConfig, env: DistEnv):
    """The HF student on this rank's device with its trainable flags set (before any FSDP wrapping),
    and the counts."""
    if env.device.type != "cuda" and cfg.student.frozen_dtype not in (None, cfg.student.dtype):
        raise ValueError("student.frozen_dtype other than student.dtype needs a GPU")
    student_cfg = cfg.student
    if env.device.type == "cuda" and student_cfg.frozen_dtype is None:
        # Frozen weights never update and every matmul reads them in the compute dtype: keeping them
        # in it halves their memory and spares a cast per use.
        student_cfg = dataclasses.replace(student_cfg, frozen_dtype=student_cfg.compute_dtype)
    student = load_student(student_cfg, seed=cfg.seed, device=env.device)
    counts = select_trainable(student, cfg.student.train, cfg.student.freeze)
    cast_trained(student, cfg.student.dtype)
    print0(counts.describe())
    return student, counts


def build_distill_model(cfg: TrainConfig, env: DistEnv, student, spec: ShardSpec,
                        dense: TeacherHeadRecord | None = None):
    """DistillModel around the student, parallelised and in train mode; and its FLOPs per token.
    `dense`: the cache's teacher head record (kl_mode dense), loaded here onto the device."""
    loss_cfg = cfg.loss.to_loss_config()
    head = None
    if loss_cfg.kl_mode == "dense" and dense is None:
        raise ValueError("loss.kl_mode 'dense' needs its cache's dense_head (vpmoe train reads it; autotune "
                         "does not size the teacher head: autotune with kl_mode: tail)")
    if dense is not None:
        head = load_teacher_head(dense, loss_cfg.dense_head_path, env.device)
    # The same seed on every rank: each builds the same new projections.
    torch.manual_seed(cfg.seed)
    with env.device:
        model = DistillModel(student, loss_cfg, TargetLayout.from_spec(spec, loss_cfg), head,
                             dense.layer if dense is not None else 0)
    flops = flops_model(student, student.config, cfg.data.seq_len)
    model = parallel.parallelize(model, env, ParallelConfig(
        compute_dtype=cfg.student.compute_dtype, activation_checkpointing=cfg.activation_checkpointing,
        compile=cfg.compile, frozen=cfg.frozen_weights))
    model.train()
    return model, flops


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg = cfg
        self.train_loader = self.eval_loader = self.logger = self.held_lock = None
        # Loader threads decode beside this thread's kernel launches (see common.gil).
        self._switch_interval = shorten_switch_interval()
        try:
            self._build(resume)
        except BaseException:
            self.close()  # loader threads of a half-built trainer
            raise

    def _build(self, resume: str | None) -> None:
        cfg = self.cfg
        self.env: DistEnv = parallel.init_distributed(cfg.device)
        env = self.env
        # Before anything is written: one run per run directory (rank 0 holds the lock for all).
        self.held_lock = run_lock.acquire(cfg.run_dir) if env.is_main else None
        self.loss_cfg = cfg.loss.to_loss_config()
        torch.manual_seed(cfg.seed)

        student, self.param_counts = build_student(cfg, env)
        if cfg.data.pack:
            # Before FSDP casts anything, frozen and trained weights differ in dtype: autocast evens them.
            compute = TORCH_DTYPES[cfg.student.compute_dtype]
            with torch.autocast(env.device.type, dtype=compute, enabled=compute != torch.float32):
                check_packed_attention(student, env.device)
        vocab = student.get_output_embeddings().weight.shape[0]
        num_layers = len(decoder_layers(student))

        # Data, and every cache/config mismatch, before any training work.
        teacher_layers = self.loss_cfg.teacher_layers
        self.dense = dense_head_record(load_manifest(cfg.data.train_cache), self.loss_cfg, cfg.data.train_cache)
        if self.dense is not None:  # kl_mode dense reads the teacher's last layer too
            teacher_layers = tuple(sorted({*teacher_layers, self.dense.layer}))
        self.train_loader = CacheLoader(loader_config(cfg, cfg.data.train_cache, False, teacher_layers),
                                        env.rank, env.world_size, expected_vocab_size=vocab)
        check_cache_fits(self.train_loader.spec, self.loss_cfg, vocab, num_layers, cfg.data.train_cache)
        if cfg.eval.every > 0:
            self.eval_loader = CacheLoader(loader_config(cfg, cfg.data.eval_cache, True, teacher_layers),
                                           env.rank, env.world_size, expected_vocab_size=vocab)
            check_cache_fits(self.eval_loader.spec, self.loss_cfg, vocab, num_layers, cfg.data.eval_cache)
            if self.eval_loader.spec.targets != self.train_loader.spec.targets:
                raise ValueError(f"{cfg.data.eval_cache}: its targets ({self.eval_loader.spec.targets}) differ from "
                                 f"the train cache's ({self.train_loader.spec.targets})")
            check_eval_teacher(self.train_loader.manifest, self.eval_loader.manifest, cfg.data)
            eval_dense = dense_head_record(self.eval_loader.manifest, self.loss_cfg, cfg.data.eval_cache)
            if eval_dense is not None and eval_dense.fingerprint != self.dense.fingerprint:
                raise ValueError(f"{cfg.data.eval_cache}: its dense_head fingerprint differs from the train "
                                 "cache's (another teacher head)")

        self.accum = grad_accum_steps(cfg.data, env.world_size)
        self.total_steps = cfg.optim.steps or self.train_loader.batches_per_epoch // self.accum
        if self.total_steps < 1:
            raise ValueError(f"{cfg.data.train_cache}: one epoch holds {self.train_loader.batches_per_epoch} micro "
                             f"batches per rank, fewer than grad_accum={self.accum}; set optim.steps")

        self.model, self.flops = build_distill_model(cfg, env, student, self.train_loader.spec, self.dense)
        self.autocast = lambda: parallel.autocast_context(env, cfg.student.compute_dtype)
        self.trained_params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim, env.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)

        self.checkpointer = Checkpointer(Path(cfg.checkpoint.dir), cfg.checkpoint.keep, env)
        self.logger = MetricsLogger(cfg.jsonl_path, env.is_main, cfg.log.tensorboard)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.eval_history: list[float] = []
        resume_path = resolve_resume(Path(cfg.checkpoint.dir), resume)
        if resume is not None and resume_path is None:
            print0(f"--resume: no checkpoint in {cfg.checkpoint.dir} yet; starting from step 0")
        if resume_path is not None:
            load_start = time.perf_counter()
            self.step = self.checkpointer.load(resume_path, self.model, self.optimizer, self.scheduler,
                                               self.train_loader)
            self.last_checkpoint = resume_path
            print0(f"resumed from {resume_path} at step {self.step} "
                   f"(loaded in {time.perf_counter() - load_start:.2f} s)")
        self.logger.truncate_after(self.step)  # every start: no step is logged twice
        print0(f"world size {env.world_size} x micro batch {cfg.data.micro_batch} x grad accum {self.accum} "
               f"= {env.world_size * cfg.data.micro_batch * self.accum} sequences per step; "
               f"{self.total_steps} steps; {self.train_loader.batches_per_epoch} micro batches per rank per epoch")

    # ------------------------------------------------------------ the loop

    def train(self) -> TrainSummary:
        cfg, env = self.cfg, self.env
        throughput = Throughput()
        batches = iter(self.train_loader)
        stopped_early = False
        if self.step == 0 and self.eval_loader is not None:
            self._eval()
        while self.step < self.total_steps:
            start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(self.accum)]
            record = self._train_step(micro_batches)
            throughput.add(record["tokens"], time.perf_counter() - start)
            self.step += 1
            if self.step % cfg.log.every == 0 or self.step == self.total_steps:
                self._log_train(record, throughput)
            if cfg.eval.every and self.eval_loader is not None and self.step % cfg.eval.every == 0:
                if self._eval() and self.step < self.total_steps:
                    stopped_early = True
                    print0(f"early stop at step {self.step}: eval loss rose {cfg.eval.early_stop_patience} "
                           "evaluations in a row")
                    break
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self._save()
        if self.eval_loader is not None and cfg.eval.every and self.step % cfg.eval.every and not stopped_early:
            self._eval()
        if self.last_checkpoint is None or self.last_checkpoint.name != step_dir_name(self.step):
            self._save()
        export_dir = None
        if cfg.export.enabled:
            export_dir = export_hf(self.model, cfg.export_dir, env, cfg.export.dtype, cfg.student.path)
            print0(f"exported HF model to {cfg.export_dir}")
        return self._summary(throughput, stopped_early, export_dir)

    def _train_step(self, micro_batches) -> dict:
        env = self.env
        # Global normalisers first: every micro batch's loss is divided by the step's totals.
        counts = torch.zeros(3, dtype=torch.float64)
        for mb in micro_batches:
            # with loss.channel_weights: each valid position counted with its weight
            counts[0] += weighted_valid_tokens(mb, self.loss_cfg.channel_weights)
            if mb.hidden_mask_BL is not None:
                counts[1] += mb.hidden_mask_BL.sum()
            counts[2] += mb.num_tokens
        num_valid, num_hidden, tokens = all_reduce_sum(counts.to(env.device)).tolist()

        sums_F = torch.zeros(len(LossSums.FIELDS) + 1, dtype=torch.float64, device=env.device)
        for index, mb in enumerate(micro_batches):
            parallel.sync_after_micro_batch(self.model, index == len(micro_batches) - 1, self.cfg.frozen_weights)
            mb = mb.to(env.device, non_blocking=True)
            with self.autocast():
                loss, sums = self.model(mb, num_valid, num_hidden)
            with record_function("vpmoe.backward"):
                loss.backward()
            sums_F[0] += loss.detach().double()
            sums_F[1:] += sums.as_tensor().to(sums_F.device)
        with record_function("vpmoe.grad_clip"):
            grad_norm = self._clip_grads()
        all_reduce_sum(sums_F)
        loss_value = float(sums_F[0])
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            where = self.last_checkpoint or "none saved yet"
            raise NonFiniteError(f"step {self.step + 1}: non-finite loss ({loss_value}) or gradient norm "
                                 f"({grad_norm}); stopped before the optimizer step; last checkpoint: {where}")
        lr = self.optimizer.param_groups[0]["lr"]
        with record_function("vpmoe.optimizer"):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        parts = summarise(sums_F[1:].cpu(), self.loss_cfg)
        return {"kind": "train", "step": self.step + 1, "loss": loss_value, "ce": parts["ce"], "kl": parts["kl"],
                "hidden_cos": parts.get("hidden_cos"), "top1": parts["top1"], "grad_norm": grad_norm, "lr": lr,
                "valid_tokens": int(num_valid), "tokens": int(tokens)}  # tokens: real ones, all ranks

    def _clip_grads(self) -> float:
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.trained_params, clip if clip > 0 else math.inf, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _log_train(self, record: dict, throughput: Throughput) -> None:
        tokens_per_s = throughput.lap()
        per_device = tokens_per_s / self.env.world_size
        record.update(tokens_per_s=tokens_per_s, tokens_per_s_per_device=per_device,
                      mfu=mfu(per_device, self.flops, self.env.device),
                      peak_mem_gib=peak_memory_gib(self.env.device), elapsed_s=throughput.elapsed)
        self.logger.log(record)

    def _eval(self) -> bool:
        """Runs an eval and logs it; True when the early-stop rule fires."""
        result = evaluate(self.model, self.eval_loader, self.env, self.loss_cfg, self.autocast())
        self.logger.log({"kind": "eval", "step": self.step, **result})
        self.eval_history.append(result["loss"])
        patience = self.cfg.eval.early_stop_patience
        recent = self.eval_history[-(patience + 1):]
        return patience > 0 and len(recent) == patience + 1 and all(b > a for a, b in zip(recent, recent[1:]))

    def _save(self) -> None:
        start = time.perf_counter()
        self.last_checkpoint = self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler,
                                                      self.train_loader)
        print0(f"saved {self.last_checkpoint} in {time.perf_counter() - start:.2f} s")

    def _summary(self, throughput: Throughput, stopped_early: bool, export_dir) -> TrainSummary:
        seconds = throughput.elapsed  # wall time of the run, evals and checkpoints included
        tokens = throughput.total_tokens
        tokens_per_s = tokens / max(throughput.total_seconds, 1e-9)
        per_device = tokens_per_s / self.env.world_size
        price = self.cfg.gpu_hour_price
        cost = None
        if price > 0 and tokens > 0:
            cost = price * self.env.world_size * seconds / 3600 / (tokens / 1e6)
        summary = TrainSummary(steps=self.step, tokens=tokens, seconds=seconds, tokens_per_s=tokens_per_s,
                               tokens_per_s_per_device=per_device, mfu=mfu(per_device, self.flops, self.env.device),
                               peak_mem_gib=peak_memory_gib(self.env.device), cost_per_mtok=cost,
                               stopped_early=stopped_early,
                               last_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                               export_dir=str(export_dir) if export_dir else None)
        self.logger.log({"kind": "summary", "step": self.step, **{k: v for k, v in vars(summary).items()
                                                                   if k != "steps"}})
        if cost is not None:
            print0(f"cost: {cost:.4f} per million tokens at {price} per GPU-hour x {self.env.world_size} GPUs")
        return summary

    def close(self) -> None:
        for loader in (self.train_loader, self.eval_loader):
            if loader is not None:
                loader.close()
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        if self.logger is not None:
            self.logger.close()
        if self.held_lock is not None:
            run_lock.release(self.held_lock)
            self.held_lock = None


def run(cfg: TrainConfig, resume: str | None = None) -> TrainSummary:
    """Builds, trains, exports, and shuts the process group down (also on errors)."""
    trainer = None
    clean = False
    try:
        trainer = Trainer(cfg, resume)
        summary = trainer.train()
        clean = True
        return summary
    finally:
        if trainer is not None:
            trainer.close()
            # The model, optimizer and FSDP state reference the process group's work: free
            # them (cycles too) while the group and the interpreter are alive, not at exit,
            # where gloo's threads releasing tensors can abort the process.
            trainer = None
            gc.collect()
        parallel.shutdown(clean)

"""Checkpoints (torch.distributed.checkpoint) and the final HF export.

A checkpoint is a directory `step-NNNNNNNN/` holding the DCP files of the
trained model state and the optimizer (each rank writes its shards),
`frozen.json` (a fingerprint of the frozen weights, which are rebuilt at start:
see frozen_state), `trainer.json` (step, scheduler, world size) and
`rank-NNNNN.json` per rank (loader position, RNG states). It is
written under `.tmp-step-NNNNNNNN/`, completed with a `COMPLETE` marker, and
only then renamed into place, so a crash mid-save leaves the previous
checkpoints untouched and the half-written one is never picked for resume.
Rank files are JSON, and DCP's own files are read without running code they
might carry (see checkpoint_reader), so resuming from a handed-over directory
cannot execute it.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from common.atomic import TMP_PREFIX, atomic_write_text, fsync_dir
from common.causal_lm import TORCH_DTYPES
from student_train.checkpoint_reader import load_checkpoint_state
from student_train.frozen_state import (FROZEN_FILE, check_fingerprint, frozen_fingerprint, frozen_names,
                                        trained_state)
from student_train.model import PROJECTIONS_FILE
from student_train.parallel import DistEnv, barrier

COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{8})$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint, oldest first."""
    found = []
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = complete_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def resolve_resume(ckpt_dir: Path, resume: str | None) -> Path | None:
    """--resume "" -> latest (or None: a fresh start); --resume PATH -> that checkpoint, which must be complete."""
    if resume is None:
        return None
    if resume == "":
        return latest_checkpoint(ckpt_dir)
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume {path}: no such checkpoint directory")
    if not (path / COMPLETE).is_file():
        raise ValueError(f"--resume {path}: checkpoint is incomplete (no {COMPLETE} marker)")
    return path


class Checkpointer:
    def __init__(self, ckpt_dir: Path, keep: int, env: DistEnv):
        self.dir = Path(ckpt_dir)
        self.keep = keep
        self.env = env
        # Frozen weights never change within a run: fingerprinted once (a collective when sharded).
        self._frozen_prints: dict[str, list[float]] | None = None
        if env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(f"{TMP_PREFIX}step-*"):  # left by a run killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def frozen_prints(self, model: nn.Module) -> dict[str, list[float]]:
        if self._frozen_prints is None:
            self._frozen_prints = frozen_fingerprint(model)
        return self._frozen_prints

    def save(self, step: int, model: nn.Module, optimizer, scheduler, loader) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.dir / step_dir_name(step)
        tmp = self.dir / f"{TMP_PREFIX}{final.name}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        # Frozen weights are rebuilt at start; only their fingerprint is kept (frozen_state).
        model_sd = trained_state(model_sd, frozen_names(model))
        prints = self.frozen_prints(model)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        rank_state = {"rank": self.env.rank, "loader": loader.state_dict(), "rng": rng_state()}
        atomic_write_text(tmp / rank_file(self.env.rank), json.dumps(_jsonable(rank_state)))
        barrier()
        if self.env.is_main:
            trainer = {"step": step, "world_size": self.env.world_size, "scheduler": scheduler.state_dict()}
            atomic_write_text(tmp / "trainer.json", json.dumps(_jsonable(trainer)))
            atomic_write_text(tmp / FROZEN_FILE, json.dumps(prints))
            atomic_write_text(tmp / COMPLETE, f"{step}\n")
            if final.exists():  # a rerun of the same step: the new one replaces it
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(self.dir)
            for _, old in complete_checkpoints(self.dir)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer, scheduler, loader) -> int:
        """Restores everything saved; returns the step the checkpoint was taken after."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        path = Path(path)
        trainer = json.loads((path / "trainer.json").read_text())
        if trainer["world_size"] != self.env.world_size:
            raise ValueError(f"{path}: saved with {trainer['world_size']} ranks, this run has "
                             f"{self.env.world_size}; the loader position is per rank")
        rank_path = path / rank_file(self.env.rank)
        if not rank_path.is_file():
            raise ValueError(f"{rank_path}: missing (checkpoint incomplete for rank {self.env.rank})")
        check_fingerprint(path, self.frozen_prints(model))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": trained_state(model_sd, frozen_names(model)), "optim": optim_sd}
        load_checkpoint_state(state, path, no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))  # frozen weights: as rebuilt and checked
        scheduler.load_state_dict(trainer["scheduler"])
        rank_state = json.loads(rank_path.read_text())
        loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        return int(trainer["step"])


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"torch": _b64(torch.get_rng_state()), "python": random.getstate(),
             "numpy": list(np.random.get_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


# ---------------------------------------------------------------- HF export


def export_hf(model: nn.Module, out_dir: Path, env: DistEnv, dtype: str | None = None,
              source_path: str | None = None) -> Path | None:
    """Gathers the full student on rank 0 and writes `save_pretrained` safetensors atomically.

    Learned hidden projections go next to it in hidden_projections.safetensors.
    Every rank must call this (the gather is a collective); rank 0 returns the path.
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out_dir = Path(out_dir)
    if env.is_main:
        cast = (lambda t: t.to(TORCH_DTYPES[dtype])) if dtype else (lambda t: t)
        student_sd = {k.removeprefix("student."): cast(v) for k, v in full.items() if k.startswith("student.")}
        proj_sd = {k.removeprefix("projections."): cast(v).contiguous()
                   for k, v in full.items() if k.startswith("projections.")}
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f"{TMP_PREFIX}{out_dir.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        student = model.student
        student.save_pretrained(tmp, state_dict=student_sd, safe_serialization=True)
        if dtype:
            config = json.loads((tmp / "config.json").read_text())
            config["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
            atomic_write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True))
        if proj_sd:
            save_file(proj_sd, str(tmp / PROJECTIONS_FILE), metadata={"format": "pt"})
        if source_path and Path(source_path).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(source_path) / name).is_file():
                    shutil.copy2(Path(source_path) / name, tmp / name)
        old = out_dir.parent / f"{TMP_PREFIX}{out_dir.name}.old"
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        tmp.rename(out_dir)
        fsync_dir(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return out_dir if env.is_main else None


def load_projections(export_dir: Path) -> dict[str, torch.Tensor]:
    """The hidden projections an export holds (empty when the widths matched)."""
    from safetensors.torch import load_file

    path = Path(export_dir) / PROJECTIONS_FILE
    return load_file(str(path)) if path.is_file() else {}


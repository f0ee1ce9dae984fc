"""A production rehearsal: the whole pipeline through the real CLI, each command
a subprocess, on every visible GPU (or 2 gloo ranks on the CPU), ending in one
table of what each stage costs and the phase-1 plan that follows from it.

    python bench/rehearsal.py --device cuda --layers 24 --rows-train 256 --rows-val 32 --max-len 4096 \\
        --steps 30 --scratch /tmp/rehearsal --out runs/rehearsal
    python bench/rehearsal.py --device cpu --out runs/rehearsal-cpu    # tiny shapes, minutes on 2 cores

Stages, in this order (`--stages a,b,...`; `train` = train_a,train_b,train_c,train_1gpu):
  prepare     a chat-mix dataset in the phase-1 schema (bench/chat_mix.py); teacher and student:
              GPT-OSS-20B's config with `--layers` layers (bench/gpt_oss_shape.py; the teacher in MXFP4
              with dummy weights), or on the CPU its 2-layer miniature with random weights
  cache       `cache-teacher` over both splits (vLLM on GPUs 0..N-1, or hf on the CPU): top-64 at
              T=1,2, the middle and last layers' hidden states in fp8 at token fraction 0.25;
              then `inspect-shard --verify` on both
  cache_1gpu  the train split on GPU 0 alone (1 -> N scaling; GPU only)
  autotune    `autotune --seq-len MAX_LEN --target-gbs 256 512` on N ranks
  train_a     `train` with configs/phase1_gptoss20b_smoke.yaml on N ranks, uninterrupted
  train_b     the same again: |B - A| is the run-to-run spread of the kernels
  train_c     the same, SIGKILLed (its whole process tree) once its first checkpoint is complete,
              then `--resume` to the end: |C - A| against |B - A| (both 0 on the CPU)
  train_1gpu  one rank (1 -> N scaling; GPU only)
  export      train_a's HF export (train_b's when run A did not run here) loaded with
              AutoModelForCausalLM.from_pretrained; one forward
  from_export `train` started from that export (`student.path`: each rank reads its tensors
              from the safetensors files) on N ranks and on one, a few steps: build time,
              time to first step, peak host memory
Every command makes the table and OUT/rehearsal.json from the results so far
(OUT/.stages/*.json), so a GPU rehearsal can be split over several commands
with the same flags; later stages use the files earlier ones left in SCRATCH.
Each command's output is in OUT/logs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import rehearsal_report  # noqa: E402
from bench.watched_run import Watched, run_watched  # noqa: E402
from demo.quickstart import Stages  # noqa: E402
from student_train.checkpoint import complete_checkpoints  # noqa: E402

STAGES = ("prepare", "cache", "cache_1gpu", "autotune", "train_a", "train_b", "train_c", "train_1gpu", "export",
          "from_export")
TRAIN_STAGES = ("train_a", "train_b", "train_c", "train_1gpu")
GPU_ONLY = ("cache_1gpu", "train_1gpu")
TRAIN_CONFIG = ROOT / "configs" / "phase1_gptoss20b_smoke.yaml"
TOP_K = 64
TEMPERATURES = "1,2"
HIDDEN_DTYPE = "fp8"
HIDDEN_TOKEN_FRACTION = 0.25
TARGET_GLOBAL_BATCHES = (256, 512)
CPU_WORLD = 2
# Settings that change what `prepare` wrote; later commands must agree with it on these.
MIX_SUMMARY = "chat_mix.json"
PREPARED_KEYS = ("device", "layers", "rows_train", "rows_val", "min_len", "max_len", "seed")


@dataclass(frozen=True)
class Settings:
    device: str  # cuda | cpu
    world: int  # GPUs (cuda) or gloo ranks (cpu)
    layers: int
    rows_train: int
    rows_val: int
    min_len: int
    max_len: int
    steps: int
    scaling_steps: int
    micro_batch: int
    grad_accum: int
    eval_every: int
    checkpoint_every: int
    rows_per_shard: int
    attn: str | None
    keep_checkpoints: bool
    seed: int = 0
    cache_args: tuple[str, ...] = ()
    train_sets: tuple[str, ...] = ()
    autotune_recompute: str = "config"  # "measure": autotune times recompute off and on (twice the probes)

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def hidden_layers(self) -> tuple[int, int]:
        return (self.layers // 2, self.layers)


@dataclass
class Context:
    settings: Settings
    out: Path
    scratch: Path
    stages: Stages
    verbose: bool = False
    card: str = "cpu"
    data_from: Path | None = None  # a chat mix built elsewhere (--build-data) instead of building it here

    def path(self, *parts: str) -> Path:
        return self.scratch.joinpath(*parts)

    def run_dir(self, name: str) -> Path:
        return self.path("runs", name)

    def vpmoe(self, log_name: str, args: list[str], check: bool = True, **kwargs) -> Watched:
        """`python -m cli ARGS` from the repository root, watched; its output goes to OUT/logs/LOG_NAME.log."""
        log(f"$ vpmoe {' '.join(args)}")
        return self.watch(log_name, [sys.executable, "-m", "cli", *args], check, **kwargs)

    def watch(self, log_name: str, command: list[str], check: bool = True, **kwargs) -> Watched:
        watched = run_watched(command, self.out / "logs" / f"{log_name}.log", env=child_env(), cwd=ROOT,
                              watch_device=self.settings.on_gpu, echo=self.verbose, **kwargs)
        log(f"  {log_name}: exit {watched.returncode} after {watched.seconds:.1f} s "
            f"(log {self.out / 'logs' / (log_name + '.log')})")
        if check and watched.returncode != 0:
            raise RuntimeError(f"{log_name} failed with exit code {watched.returncode}:\n{watched.tail()}")
        return watched


def log(message: str) -> None:
    print(f"[rehearsal] {message}", flush=True)


def child_env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # Unbuffered: each line is timestamped when it arrives, so it must arrive when printed.
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- prepare


def teacher_and_student_configs(s: Settings) -> tuple[dict, dict]:
    from bench.gpt_oss_shape import gpt_oss_config

    if s.on_gpu:
        return gpt_oss_config(s.layers), gpt_oss_config(s.layers, mxfp4=False)
    return gpt_oss_config(tiny=True), gpt_oss_config(tiny=True)


def write_cpu_teacher(teacher_dir: Path, seed: int) -> None:
    """Random weights for the CPU teacher (its lm_head scaled so its distributions are peaked)."""
    from transformers import AutoConfig

    from demo.tiny_models import build_model, save_model

    save_model(build_model(AutoConfig.from_pretrained(str(teacher_dir)), seed=seed), teacher_dir)


def stage_prepare(ctx: Context) -> dict:
    from bench.chat_mix import MixShape, build_chat_mix

    s = ctx.settings
    teacher, student = teacher_and_student_configs(s)
    for name, config in (("teacher", teacher), ("student", student)):
        shutil.rmtree(ctx.path(name), ignore_errors=True)
        ctx.path(name).mkdir(parents=True)
        (ctx.path(name) / "config.json").write_text(json.dumps(config, indent=1))
    if not s.on_gpu:
        write_cpu_teacher(ctx.path("teacher"), s.seed)
    shutil.rmtree(ctx.path("data"), ignore_errors=True)
    shape = MixShape(s.rows_train, s.rows_val, s.min_len, s.max_len, teacher["vocab_size"], s.seed)
    if ctx.data_from is not None:  # built elsewhere (`--build-data DIR` with the same flags): no `datasets` here
        summary = json.loads((ctx.data_from / MIX_SUMMARY).read_text())
        if summary["shape"] != dataclasses.asdict(shape):
            raise ValueError(f"--data-from {ctx.data_from}: built for {summary['shape']}, this run needs "
                             f"{dataclasses.asdict(shape)}")
        shutil.copytree(ctx.data_from, ctx.path("data"))
        data = summary["data"]
    else:
        data = build_chat_mix(ctx.path("data"), shape)
    return {"settings": dataclasses.asdict(s), "data": data, "vocab_size": teacher["vocab_size"],
            "token_mapping": "two UTF-8 bytes of Python standard-library source per token (bench/chat_mix.py)",
            "teacher": {"layers": teacher["num_hidden_layers"], "hidden_size": teacher["hidden_size"],
                        "weights": "dummy (vLLM --load-format dummy), MXFP4 experts" if s.on_gpu else "random"}}


# ---------------------------------------------------------------- cache


def cache_args(ctx: Context, split: str, out_dir: Path, gpus: list[int]) -> list[str]:
    s = ctx.settings
    args = ["cache-teacher", "--model", str(ctx.path("teacher")), "--data", str(ctx.path("data")), "--split", split,
            "--out", str(out_dir), "--top-k", str(TOP_K), "--temperatures", TEMPERATURES,
            "--hidden-layers", ",".join(map(str, s.hidden_layers)), "--hidden-dtype", HIDDEN_DTYPE,
            "--hidden-token-fraction", str(HIDDEN_TOKEN_FRACTION), "--rows-per-shard", str(s.rows_per_shard),
            "--no-progress"]
    if s.on_gpu:
        args += ["--backend", "vllm", "--gpus", ",".join(map(str, gpus)), "--load-format", "dummy"]
    else:
        args += ["--backend", "hf", "--device", "cpu"]
    return args + list(s.cache_args)


def run_cache(ctx: Context, log_name: str, split: str, out_dir: Path, gpus: list[int]) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh cache: a resume would only verify and skip
    watched = ctx.vpmoe(log_name, cache_args(ctx, split, out_dir, gpus))
    return rehearsal_report.cache_figures(watched, out_dir, workers=max(len(gpus), 1))


def inspect_cache(ctx: Context, split: str) -> dict:
    watched = ctx.vpmoe(f"inspect_{split}", ["inspect-shard", str(ctx.path("cache", split)), "--verify", "--json"])
    report = rehearsal_report.last_json_line(watched)
    return {"totals": report["totals"], "verify": report["verify"], "seconds": watched.seconds,
            "columns": {c["name"]: c["compressed_per_token"] for c in report["columns"]}}


def stage_cache(ctx: Context) -> dict:
    gpus = list(range(ctx.settings.world)) if ctx.settings.on_gpu else []
    result = {split: run_cache(ctx, f"cache_{split}", split, ctx.path("cache", split), gpus)
              for split in ("train", "validation")}
    result["inspect"] = {split: inspect_cache(ctx, split) for split in ("train", "validation")}
    return {**result, "top_k": TOP_K, "hidden_layers": list(ctx.settings.hidden_layers),
            "hidden_dtype": HIDDEN_DTYPE, "hidden_token_fraction": HIDDEN_TOKEN_FRACTION}


def stage_cache_1gpu(ctx: Context) -> dict:
    return run_cache(ctx, "cache_1gpu_train", "train", ctx.path("cache-1gpu", "train"), [0])


# ---------------------------------------------------------------- autotune and train


def train_sets(ctx: Context, run: str, world: int, steps: int, evaluate: bool = True, export: bool = True
               ) -> list[str]:
    """`--set` overrides of the smoke config for one run on `world` ranks."""
    s = ctx.settings
    run_dir = ctx.run_dir(run)
    (a, b) = s.hidden_layers
    sets = [
        "student.path=null", f"student.init_config={ctx.path('student')}",
        f"data.train_cache={ctx.path('cache', 'train')}", f"data.eval_cache={ctx.path('cache', 'validation')}",
        f"data.seq_len={s.max_len}", f"data.micro_batch={s.micro_batch}",
        f"data.global_batch={s.micro_batch * s.grad_accum * world}",
        f"loss.layer_pairs=[[{a},{a}],[{b},{b}]]", f"optim.steps={steps}",
        f"eval.every={s.eval_every if evaluate else 0}", f"eval.samples={s.rows_val}",
        f"checkpoint.dir={run_dir / 'checkpoints'}", f"checkpoint.every={s.checkpoint_every if evaluate else 0}",
        "checkpoint.keep=1", f"export.dir={run_dir / 'export'}", f"export.enabled={str(export).lower()}",
        f"log.jsonl={run_dir / 'log.jsonl'}", "log.tensorboard=null",
    ]
    if s.on_gpu:
        sets += [f"student.attn_implementation={s.attn}"] if s.attn else []
    else:
        # The smoke config's GPU settings (flex attention, compiled blocks and loss chunks) do not
        # suit GPT-OSS sinks on a CPU of 2 cores.
        sets += ["device=cpu", "data.pin_memory=false", "data.num_threads=1", "data.prefetch=2",
                 "student.experts_implementation=eager", "student.attn_implementation=eager", "compile=false",
                 "loss.compile_chunks=false", "data.pad_to_multiple=1"]
    return sets + list(s.train_sets)


def set_args(sets: list[str]) -> list[str]:
    return [arg for item in sets for arg in ("--set", item)]


def stage_autotune(ctx: Context) -> dict:
    s = ctx.settings
    args = ["autotune", str(TRAIN_CONFIG), "--seq-len", str(s.max_len),
            *[a for g in TARGET_GLOBAL_BATCHES for a in ("--target-gbs", str(g))], "--json",
            "--nproc-per-node", str(s.world), "--recompute", s.autotune_recompute,
            *set_args(train_sets(ctx, "autotune", s.world, 1))]
    if not s.on_gpu:
        args += ["--max-micro-batch", "2"]  # on the CPU nothing runs out of memory in useful time
    watched = ctx.vpmoe("autotune", args)
    return {"seconds": watched.seconds, **rehearsal_report.last_json_line(watched)}


def run_train(ctx: Context, log_name: str, run: str, world: int, steps: int, resume: bool = False,
              evaluate: bool = True, export: bool = True, **watch_kwargs) -> Watched:
    args = ["train", str(TRAIN_CONFIG), "--nproc-per-node", str(world),
            *set_args(train_sets(ctx, run, world, steps, evaluate, export))]
    return ctx.vpmoe(log_name, args + (["--resume"] if resume else []), **watch_kwargs)


def fresh_run(ctx: Context, run: str) -> None:
    shutil.rmtree(ctx.run_dir(run), ignore_errors=True)
    ctx.run_dir(run).mkdir(parents=True)


def free_disk(ctx: Context, run: str, keep_export: bool) -> None:
    """At the 24-layer shape a checkpoint is GBs (trained weights and optimizer state): once measured, it goes."""
    if ctx.settings.on_gpu and not ctx.settings.keep_checkpoints:
        shutil.rmtree(ctx.run_dir(run) / "checkpoints", ignore_errors=True)
        if not keep_export:
            shutil.rmtree(ctx.run_dir(run) / "export", ignore_errors=True)


def has_export(ctx: Context, run: str) -> bool:
    return (ctx.run_dir(run) / "export" / "config.json").is_file()


def uninterrupted(ctx: Context, run: str, keep_export: bool) -> dict:
    s = ctx.settings
    fresh_run(ctx, run)
    # One run exports (its figures and the load-back come from it): a 24-layer export is 42 GB.
    watched = run_train(ctx, f"train_{run}", run, s.world, s.steps, export=keep_export)
    result = rehearsal_report.train_figures(ctx.run_dir(run), [watched])
    free_disk(ctx, run, keep_export)
    return result


def stage_train_a(ctx: Context) -> dict:
    return uninterrupted(ctx, "a", keep_export=True)


def stage_train_b(ctx: Context) -> dict:
    # B exports when A's export is not on this machine (A ran elsewhere or earlier): the export stage loads it.
    return uninterrupted(ctx, "b", keep_export=not has_export(ctx, "a"))


def stage_train_c(ctx: Context) -> dict:
    """Killed (SIGKILL to every process of the run) right after its first checkpoint is complete, then resumed."""
    s = ctx.settings
    fresh_run(ctx, "c")
    checkpoints = ctx.run_dir("c") / "checkpoints"
    killed = run_train(ctx, "train_c_killed", "c", s.world, s.steps, check=False, export=False,
                       kill_when=lambda: bool(complete_checkpoints(checkpoints)))
    if killed.killed_at_s is None:
        raise RuntimeError(f"run C ended (exit {killed.returncode}) before a complete checkpoint was seen; "
                           f"raise --steps or lower --checkpoint-every:\n{killed.tail()}")
    at_kill = rehearsal_report.kill_snapshot(ctx.run_dir("c"), killed)
    resumed = run_train(ctx, "train_c_resumed", "c", s.world, s.steps, resume=True, export=False)
    result = rehearsal_report.train_figures(ctx.run_dir("c"), [killed, resumed])
    free_disk(ctx, "c", keep_export=False)
    return {**result, "kill": at_kill}


def stage_train_1gpu(ctx: Context) -> dict:
    fresh_run(ctx, "one")
    watched = run_train(ctx, "train_1gpu", "one", 1, ctx.settings.scaling_steps, evaluate=False, export=False)
    result = rehearsal_report.train_figures(ctx.run_dir("one"), [watched])
    free_disk(ctx, "one", keep_export=False)
    return result


# ---------------------------------------------------------------- export


def check_export(export_dir: Path, device: str, tokens: list[int]) -> dict:
    """Load an export as a user would and run one forward on a few tokens (run in its own process)."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(export_dir))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    model = model.to(device)
    to_device_s = time.perf_counter() - start
    input_ids = torch.tensor([tokens], device=device)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    if device == "cuda":
        torch.cuda.synchronize()
    forward_s = time.perf_counter() - start
    return {"load_s": load_s, "to_device_s": to_device_s, "forward_s": forward_s,
            "logits_shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all()),
            "dtype": str(next(model.parameters()).dtype), "parameters": sum(p.numel() for p in model.parameters())}


def export_run(ctx: Context) -> str:
    run = next((r for r in ("a", "b") if has_export(ctx, r)), None)
    if run is None:
        raise RuntimeError(f"{ctx.run_dir('a')}: no export (run stage train_a or train_b first)")
    return run


def stage_export(ctx: Context) -> dict:
    from teacher_cache.data import open_source  # the product's reader: no `datasets` needed on the GPU machine

    run = export_run(ctx)
    export_dir = ctx.run_dir(run) / "export"
    tokens = [int(t) for t in open_source(ctx.path("data"), "validation", 1).row(0).input_ids[:16]]
    command = [sys.executable, str(Path(__file__).resolve()), "--check-export", str(export_dir),
               "--device", ctx.settings.device, "--tokens", ",".join(map(str, tokens))]
    log(f"$ {' '.join(command)}")
    watched = ctx.watch("export_check", command)
    return {**rehearsal_report.last_json_line(watched), "run": run.upper(), "seconds": watched.seconds,
            "peak_host_gib": watched.peak_host_gib, "export_bytes": rehearsal_report.du(export_dir)}


FROM_EXPORT_STEPS = 4
FROM_EXPORT_FIGURES = ("world", "startup_s", "time_to_first_step_s", "peak_host_gib", "peak_device_gib",
                       "peak_mem_gib", "steps", "losses")


def stage_from_export(ctx: Context) -> dict:
    """A run that starts from the export (what a phase-2 run does with phase 1's result)."""
    s = ctx.settings
    run = export_run(ctx)
    result = {"export_run": run.upper()}
    for world in sorted({s.world, 1}, reverse=True):
        name = f"from_export_{world}"
        fresh_run(ctx, name)
        sets = [x for x in train_sets(ctx, name, world, FROM_EXPORT_STEPS, evaluate=False, export=False)
                if not x.startswith(("student.path=", "student.init_config="))]
        sets += [f"student.path={ctx.run_dir(run) / 'export'}", "student.init_config=null"]
        watched = ctx.vpmoe(name, ["train", str(TRAIN_CONFIG), "--nproc-per-node", str(world), *set_args(sets)])
        figures = rehearsal_report.train_figures(ctx.run_dir(name), [watched])
        result[f"ranks_{world}"] = {key: figures[key] for key in FROM_EXPORT_FIGURES}
        free_disk(ctx, name, keep_export=False)
    return result


STAGE_FUNCTIONS = {"prepare": stage_prepare, "cache": stage_cache, "cache_1gpu": stage_cache_1gpu,
                   "autotune": stage_autotune, "train_a": stage_train_a, "train_b": stage_train_b,
                   "train_c": stage_train_c, "train_1gpu": stage_train_1gpu, "export": stage_export,
                   "from_export": stage_from_export}


# ---------------------------------------------------------------- the command


def parse_stages(text: str, on_gpu: bool) -> list[str]:
    names = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        expanded = STAGES if item == "all" else TRAIN_STAGES if item == "train" else (item,)
        for name in expanded:
            if name not in STAGES:
                raise ValueError(f"--stages: unknown stage {name!r} (stages: {', '.join(STAGES)}, train, all)")
            if on_gpu or name not in GPU_ONLY:
                names.append(name)
    return [name for name in STAGES if name in names]


def build_data_elsewhere(args: argparse.Namespace) -> None:
    """--build-data DIR: the chat mix the given flags ask for, built here for a machine without `datasets`."""
    from bench.chat_mix import MixShape, build_chat_mix

    s = settings_from_args(args, world=1)
    teacher, _ = teacher_and_student_configs(s)
    shape = MixShape(s.rows_train, s.rows_val, s.min_len, s.max_len, teacher["vocab_size"], s.seed)
    shutil.rmtree(args.build_data, ignore_errors=True)
    data = build_chat_mix(args.build_data, shape)
    (args.build_data / MIX_SUMMARY).write_text(json.dumps({"shape": dataclasses.asdict(shape), "data": data}))
    log(f"chat mix for {dataclasses.asdict(shape)} in {args.build_data}; run with --data-from {args.build_data}")


def settings_from_args(args: argparse.Namespace, world: int | None = None) -> Settings:
    on_gpu = args.device == "cuda"
    if not on_gpu and args.layers not in (None, 2):
        raise ValueError("--device cpu uses GPT-OSS's 2-layer miniature; --layers is for --device cuda")

    def pick(value, gpu_default, cpu_default):
        return value if value is not None else (gpu_default if on_gpu else cpu_default)

    world = world or (visible_gpus() if on_gpu else CPU_WORLD)
    if world < 1:
        raise ValueError("--device cuda: no GPU is visible")
    rows_train = pick(args.rows_train, 256, 32)
    cache_workers = world if on_gpu else 1
    return Settings(
        device=args.device, world=world, layers=pick(args.layers, 24, 2), rows_train=rows_train,
        rows_val=pick(args.rows_val, 32, 8), min_len=pick(args.min_len, 256, 16),
        max_len=pick(args.max_len, 4096, 128), steps=args.steps, scaling_steps=args.scaling_steps,
        micro_batch=args.micro_batch, grad_accum=args.grad_accum, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        # Several shards per worker: the steady rate is read from the times shards are published.
        rows_per_shard=args.rows_per_shard or max(1, rows_train // (cache_workers * 4)),
        attn=pick(args.attn, "flex_attention", None), keep_checkpoints=args.keep_checkpoints,
        seed=args.seed, cache_args=tuple(args.cache_arg or ()), train_sets=tuple(args.train_set or ()),
        autotune_recompute=args.autotune_recompute)


def visible_gpus() -> int:
    import torch  # the device count only: no CUDA context in this process, the GPUs are the children's

    return torch.cuda.device_count()


def card_name(on_gpu: bool, world: int) -> str:
    if not on_gpu:
        return f"CPU, {os.cpu_count()} cores, {CPU_WORLD} gloo ranks"
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        names = ["GPU"]
    return f"{world}x {names[0].strip()}"


def check_prepared(ctx: Context) -> None:
    prepared = ctx.stages.done("prepare")
    if prepared is None:
        raise ValueError(f"{ctx.out}: nothing prepared yet; run the prepare stage first")
    earlier = prepared["settings"]
    now = dataclasses.asdict(ctx.settings)
    differ = [key for key in PREPARED_KEYS if earlier.get(key) != now[key]]
    if differ:
        changes = ", ".join(f"{key} {earlier.get(key)} -> {now[key]}" for key in differ)
        raise ValueError(f"{ctx.out}: prepared with other settings ({changes}); pass the same flags, "
                         "or run the prepare stage again")


def run_stages(ctx: Context, names: list[str]) -> None:
    for name in names:
        log(f"stage {name}")
        start = time.perf_counter()
        result = STAGE_FUNCTIONS[name](ctx)
        result["stage_seconds"] = time.perf_counter() - start
        ctx.stages.finish(name, result)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", type=Path, default=Path("runs/rehearsal"),
                    help="results: rehearsal.json, logs, stage markers")
    ap.add_argument("--scratch", type=Path, help="data, models, caches and runs (default OUT/work)")
    ap.add_argument("--stages", default="all", help=f"comma-separated: {', '.join(STAGES)}, train, all")
    ap.add_argument("--layers", type=int, help="GPT-OSS-20B layers of teacher and student (cuda; default 24)")
    ap.add_argument("--rows-train", type=int, help="default 256 (cuda), 32 (cpu)")
    ap.add_argument("--rows-val", type=int, help="default 32 (cuda), 8 (cpu)")
    ap.add_argument("--min-len", type=int, help="shortest row, default 256 (cuda), 16 (cpu); lengths log-uniform")
    ap.add_argument("--max-len", type=int, help="longest row and training seq_len, default 4096 (cuda), 128 (cpu)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--scaling-steps", type=int, default=10, help="steps of the one-GPU training run")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=4, help="per rank: global batch = micro x accum x ranks")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--rows-per-shard", type=int, default=0, help="default: rows-train / (4 x cache workers)")
    ap.add_argument("--attn", help="student.attn_implementation (default flex_attention on cuda)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep every run's checkpoints and exports (cuda)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-arg", action="append",
                    help="extra cache-teacher argument (repeatable), e.g. --cache-arg=--enforce-eager")
    ap.add_argument("--train-set", action="append", help="extra train --set KEY=VALUE (repeatable)")
    ap.add_argument("--autotune-recompute", choices=("config", "measure"), default="config",
                    help="autotune's --recompute: the config's setting (default), or both timed")
    ap.add_argument("--verbose", action="store_true", help="echo every command's output")
    ap.add_argument("--build-data", type=Path, help="only build the chat mix these flags ask for into DIR, then exit")
    ap.add_argument("--data-from", type=Path, help="copy the chat mix from DIR (made by --build-data) in prepare")
    ap.add_argument("--check-export", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    return ap


def main() -> int:
    args = build_parser().parse_args()
    if args.check_export:
        tokens = [int(t) for t in args.tokens.split(",")]
        print(json.dumps(check_export(args.check_export, args.device, tokens)))
        return 0
    if args.build_data:
        build_data_elsewhere(args)
        return 0
    try:
        settings = settings_from_args(args)
        out = args.out.resolve()
        scratch = (args.scratch or out / "work").resolve()
        ctx = Context(settings, out, scratch, Stages(out), args.verbose, card_name(settings.on_gpu, settings.world),
                      data_from=args.data_from.resolve() if args.data_from else None)
        names = parse_stages(args.stages, settings.on_gpu)
        if names and "prepare" not in names:
            check_prepared(ctx)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        run_stages(ctx, names)
    finally:
        report = rehearsal_report.build_report(ctx.stages, settings, ctx.card, STAGES, GPU_ONLY)
        rehearsal_report.write_report(out / "rehearsal.json", report)
        print(rehearsal_report.format_table(report))
        print()
        print(report["plan_text"])
        log(f"{', '.join(names) or 'no stages'} in {time.perf_counter() - start:.0f} s; {out / 'rehearsal.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

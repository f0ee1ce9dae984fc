"""The rehearsal's figures, read from what the CLI itself printed and wrote
(summary lines, log.jsonl, sidecars, inspect-shard's JSON), and its one table.

Where a figure comes from:
- cache tokens/s per GPU, steady: per worker (shard s is written by worker
  s % W), the tokens of its shards after its first over the time from the
  first's publication (sidecar mtime) to the last's; start-up and the first
  shard's fill are left out. End to end: the summary line's tokens over the
  command's wall time (process start to exit: imports, input checks, engine
  start-up and compile included), per GPU.
- train tokens/s per GPU: the median of the per-step `tokens_per_s_per_device`
  records of log.jsonl after the first WARMUP_STEPS steps (step time only:
  evals and checkpoints are not in it).
- peak GPU memory: train, the largest `peak_mem_gib` in log.jsonl (torch's
  peak allocation on rank 0; on the CPU rank 0's peak RSS); cache, the
  fullest GPU's memory in use as nvidia-smi reports it, sampled (cache-teacher
  prints no peak; vLLM reserves --gpu-memory-utilization of the card anyway).
- peak host memory: the sum of proportional set sizes over the command's whole
  process tree, sampled every 0.5 s.
- time to first step: process start to the arrival of rank 0's first `train
  step` line (model build, loaders and the step-0 eval included).
- checkpoint save/load seconds: the trainer's `saved ... in X s` and
  `resumed from ... (loaded in X s)` lines; export write seconds: the gap
  between the final `saved` line and `exported HF model`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
from pathlib import Path

from bench.phase1_plan import Assumptions, Measured, format_plan
from bench.watched_run import Watched
from student_train.checkpoint import complete_checkpoints, latest_checkpoint

WARMUP_STEPS = 2
CACHE_WROTE = re.compile(r"wrote (\d+) shard\(s\), ([\d,]+) rows, ([\d,]+) tokens, ([\d.]+) GB")
CACHE_RATE = re.compile(r"^([\d.]+) s, ([\d,]+) tokens/s")
SAVED = re.compile(r"^saved (\S+) in ([\d.]+) s")
LOADED = re.compile(r"^resumed from (\S+) at step (\d+) \(loaded in ([\d.]+) s\)")
WORLD = re.compile(r"^world size (\d+) x micro batch (\d+) x grad accum (\d+)")


def last_json_line(watched: Watched) -> dict:
    for _, line in reversed(watched.lines):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(watched.command)}: printed no JSON line:\n{watched.tail()}")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _search(watched: Watched, pattern: re.Pattern) -> re.Match:
    for _, line in watched.lines:
        match = pattern.search(line)
        if match:
            return match
    raise RuntimeError(f"{' '.join(watched.command)}: no line matches {pattern.pattern!r}:\n{watched.tail()}")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


# ---------------------------------------------------------------- cache


def shard_times(cache_dir: Path, workers: int, started_at: float) -> dict:
    """Steady tokens/s per worker from the sidecars' publication times (see the module docstring)."""
    from common.cache_dir import CacheDir

    published: dict[int, list[tuple[float, int]]] = {}
    for entry in CacheDir(cache_dir).sidecars():
        mtime = (cache_dir / (entry.file + ".json")).stat().st_mtime
        published.setdefault(entry.index % workers, []).append((mtime, entry.tokens))
    tokens = seconds = 0.0
    for shards in published.values():
        shards.sort()
        if len(shards) > 1:
            tokens += sum(t for _, t in shards[1:])
            seconds += shards[-1][0] - shards[0][0]
    return {"steady_tokens_per_s_per_gpu": tokens / seconds if seconds > 0 else None,
            "first_shard_s": min(s[0][0] for s in published.values()) - started_at if published else None,
            "shards_per_worker": sorted(len(s) for s in published.values())}


def cache_figures(watched: Watched, cache_dir: Path, workers: int) -> dict:
    wrote, rate = _search(watched, CACHE_WROTE), _search(watched, CACHE_RATE)
    tokens = _number(wrote.group(3))
    return {"workers": workers, "wall_s": watched.seconds, "summary_s": _number(rate.group(1)),
            "shards": int(wrote.group(1)),
            "rows": int(_number(wrote.group(2))), "tokens": int(tokens), "gb": float(wrote.group(4)),
            "tokens_per_s_per_gpu_end_to_end": tokens / watched.seconds / workers,
            **shard_times(cache_dir, workers, watched.started_at),
            "peak_host_gib": watched.peak_host_gib, "peak_device_gib": watched.peak_device_gib}


# ---------------------------------------------------------------- train


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def kill_snapshot(run_dir: Path, watched: Watched) -> dict:
    """What a killed run left: its complete checkpoints and how far its log got."""
    steps = [r["step"] for r in read_log(run_dir) if r["kind"] == "train"]
    return {"killed_at_s": watched.killed_at_s, "returncode": watched.returncode,
            "checkpoints": [path.name for _, path in complete_checkpoints(run_dir / "checkpoints")],
            "last_step_logged": max(steps, default=0)}


def train_figures(run_dir: Path, runs: list[Watched]) -> dict:
    """A training run's figures; `runs` are its processes in order (a killed one, then its resume)."""
    records = read_log(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    summary = next((r for r in reversed(records) if r["kind"] == "summary"), {})
    steady = [r["tokens_per_s_per_device"] for r in train if r["step"] > WARMUP_STEPS]
    mfus = [r["mfu"] for r in train if r["step"] > WARMUP_STEPS and r.get("mfu") is not None]
    first_step = runs[0].first("train step")
    started = runs[0].first("world size")
    world = WORLD.search(started[1]) if started else None
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    lines = [line for run in runs for _, line in run.lines]
    export_gap = runs[-1].gap_before("exported HF model")
    return {
        "world": int(world.group(1)) if world else None,
        "grad_accum": int(world.group(3)) if world else None,
        "steps": [r["step"] for r in train],
        "losses": [[r["step"], r["loss"]] for r in train],
        "eval": [[r["step"], r["loss"]] for r in records if r["kind"] == "eval"],
        "tokens": summary.get("tokens"),
        # real tokens per sequence of the global batch (a packed row holds several of the data's rows)
        "tokens_per_sequence": (statistics.median(r["tokens"] for r in train if "tokens" in r)
                                / (int(world.group(1)) * int(world.group(2)) * int(world.group(3)))
                                if world and any("tokens" in r for r in train) else None),
        "tokens_per_s_per_gpu": statistics.median(steady) if steady else summary.get("tokens_per_s_per_device"),
        "tokens_per_s_per_gpu_run": summary.get("tokens_per_s_per_device"),
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_mem_gib": max((r["peak_mem_gib"] for r in train), default=None),
        "wall_s": sum(run.seconds for run in runs),
        "startup_s": started[0] if started else None,
        "time_to_first_step_s": first_step[0] if first_step else None,
        "save_s": [float(m.group(2)) for m in map(SAVED.match, lines) if m],
        "load_s": [float(m.group(3)) for m in map(LOADED.match, lines) if m],
        "export_write_s": export_gap[-1] if export_gap else None,
        "checkpoint": {"dir": checkpoint.name, "bytes": du(checkpoint)} if checkpoint else None,
        "peak_host_gib": max(run.peak_host_gib for run in runs),
        "peak_device_gib": max((run.peak_device_gib for run in runs if run.peak_device_gib is not None),
                               default=None),
    }


def compare_losses(reference: dict, other: dict, key: str = "losses") -> dict:
    """Per-step loss differences of `other` against `reference` (same step numbers expected)."""
    ref, oth = dict(map(tuple, reference[key])), dict(map(tuple, other[key]))
    shared = sorted(set(ref) & set(oth))
    diffs = [abs(oth[s] - ref[s]) for s in shared]
    return {"same_steps": sorted(ref) == sorted(oth) and bool(ref), "steps": len(shared),
            "max_abs_diff": max(diffs, default=None), "mean_abs_diff": statistics.fmean(diffs) if diffs else None,
            "bitwise_equal": sorted(ref) == sorted(oth) and all(oth[s] == ref[s] for s in shared)}


# ---------------------------------------------------------------- the report


def _rate(one_gpu: dict | None, many: float | None) -> tuple[float | None, float | None]:
    """(one-GPU rate, scaling efficiency 1 -> N) from a one-GPU run's rate and the N-GPU per-GPU rate."""
    if many is None:
        return None, None
    if not one_gpu:
        return many, None
    return one_gpu, many / one_gpu


def plan_inputs(stages: dict, card: str, world: int) -> dict | None:
    cache, train, prepared = stages.get("cache", {}), stages.get("train_a", {}), stages.get("prepare", {})
    if "train" not in cache or "losses" not in train or "data" not in prepared:
        return None
    cache_one, cache_scaling = _rate(stages.get("cache_1gpu", {}).get("steady_tokens_per_s_per_gpu"),
                                     cache["train"]["steady_tokens_per_s_per_gpu"]
                                     or cache["train"]["tokens_per_s_per_gpu_end_to_end"])
    train_one, train_scaling = _rate(stages.get("train_1gpu", {}).get("tokens_per_s_per_gpu"),
                                     train["tokens_per_s_per_gpu"])
    totals = cache["inspect"]["train"]["totals"]
    return {"card": card, "cache_tokens_per_s_one_gpu": cache_one, "cache_scaling": cache_scaling or 1.0,
            "train_tokens_per_s_one_gpu": train_one, "train_scaling": train_scaling or 1.0,
            "scaling_gpus": world, "scaling_measured": cache_scaling is not None and train_scaling is not None,
            "file_bytes_per_token": totals["bytes_per_token"],
            "hidden_bytes_per_token": totals["hidden_bytes_per_token"],
            "hidden_token_fraction": cache["hidden_token_fraction"],
            "mean_row_tokens": train.get("tokens_per_sequence") or prepared["data"]["train"]["mean_len"]}


def checks(stages: dict) -> dict:
    a, b, c = (stages.get(name, {}) for name in ("train_a", "train_b", "train_c"))
    out = {}
    if "losses" in a and "losses" in b:
        out["b_vs_a"] = compare_losses(a, b)
    if "losses" in a and "losses" in c:
        out["c_vs_a"] = compare_losses(a, c)
        out["c_vs_a_eval"] = compare_losses(a, c, "eval")
    if "losses" in b and "losses" in c:
        out["c_vs_b"] = compare_losses(b, c)
    if "b_vs_a" in out and "c_vs_a" in out:
        # A resume that restores everything differs from A no more than a second straight run does.
        out["c_within_spread"] = out["c_vs_a"]["max_abs_diff"] <= out["b_vs_a"]["max_abs_diff"]
    inspect = stages.get("cache", {}).get("inspect")
    if inspect:
        out["cache_verified"] = all(v["verify"]["ok"] for v in inspect.values())
    export = stages.get("export", {})
    if "finite" in export:
        out["export_forward_finite"] = export["finite"]
    return out


def build_report(stage_store, settings, card: str, names: tuple[str, ...], gpu_only: tuple[str, ...]) -> dict:
    stages = {}
    for name in names:
        done = stage_store.done(name)
        if done is None:
            done = {"status": "skipped: GPU only" if not settings.on_gpu and name in gpu_only else "not run"}
        stages[name] = done
    report = {"card": card, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": dataclasses.asdict(settings),
              "stages": stages, "checks": checks(stages)}
    inputs = plan_inputs(stages, card, settings.world)
    report["plan_inputs"] = inputs
    report["plan_text"] = (format_plan(Measured(**inputs), Assumptions()) if inputs
                           else "phase-1 plan: needs the prepare, cache and train_a stages")
    return report


def write_report(path: Path, report: dict) -> None:
    from common.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1))


def _fmt(value, spec: str = ",.1f", unit: str = "") -> str:
    return "n/a" if value is None else f"{format(value, spec)}{unit}"


def _per_billion(tokens_per_s: float | None) -> float | None:
    return 1e9 / tokens_per_s / 3600 if tokens_per_s else None


def cache_rows(stages: dict) -> list[tuple[str, str, str, str]]:
    cache = stages.get("cache", {})
    if "train" not in cache:
        return [("cache", "not run", "", "")]
    train, val, one = cache["train"], cache["validation"], stages.get("cache_1gpu", {})
    steady = train["steady_tokens_per_s_per_gpu"]
    totals = cache["inspect"]["train"]["totals"]
    scaling = steady / one["steady_tokens_per_s_per_gpu"] if one.get("steady_tokens_per_s_per_gpu") and steady else None
    where = f"{train['workers']} worker(s), shards per worker {train['shards_per_worker']}"
    return [
        ("cache", "rows / tokens (train + validation)",
         f"{train['rows'] + val['rows']:,} / {train['tokens'] + val['tokens']:,}", "summary lines"),
        ("cache", "tokens/s per GPU, steady", _fmt(steady, ",.0f"), f"sidecar times; {where}"),
        ("cache", "tokens/s per GPU, end to end", _fmt(train["tokens_per_s_per_gpu_end_to_end"], ",.0f"),
         f"process start to exit, {train['wall_s']:.1f} s (summary line: {train['summary_s']:.1f} s)"),
        ("cache", "GPU-hours per billion tokens", _fmt(_per_billion(steady), ",.2f"), "steady rate"),
        ("cache", "peak GPU memory", _fmt(max(train["peak_device_gib"] or 0, val["peak_device_gib"] or 0) or None,
                                          ".1f", " GiB"), "nvidia-smi, sampled (not printed by cache-teacher)"),
        ("cache", "peak host memory", _fmt(max(train["peak_host_gib"], val["peak_host_gib"]), ".2f", " GiB"),
         "process tree PSS, sampled"),
        ("cache", "time to first shard", _fmt(train["first_shard_s"], ".1f", " s"), "sidecar time - process start"),
        ("cache", "bytes/token: file / targets / hidden",
         (f"{totals['bytes_per_token']:,.0f} / {totals['target_bytes_per_token']:,.0f} / "
          f"{totals['hidden_bytes_per_token']:,.0f}"), "inspect-shard --json"),
        ("cache", "inspect-shard --verify", "OK" if all(v["verify"]["ok"] for v in cache["inspect"].values())
         else "PROBLEMS", "both splits"),
        ("cache", "scaling 1 -> N GPUs (per-GPU rate)", _fmt(scaling, ".3f"),
         "steady rates" if scaling else one.get("status", "cache_1gpu not run")),
    ]


def train_rows(stages: dict, report_checks: dict) -> list[tuple[str, str, str, str]]:
    a = stages.get("train_a", {})
    if "losses" not in a:
        return [("train", "not run", "", "")]
    one, b, c = stages.get("train_1gpu", {}), stages.get("train_b", {}), stages.get("train_c", {})
    export = stages.get("export", {})
    exported = b if export.get("run") == "B" else a
    rate = a["tokens_per_s_per_gpu"]
    one_rate = one.get("tokens_per_s_per_gpu")
    scaling = rate / one_rate if one_rate else None
    scaling_b = b["tokens_per_s_per_gpu"] / one_rate if one_rate and b.get("tokens_per_s_per_gpu") else None
    saves, loads = a["save_s"] + c.get("save_s", []), c.get("load_s", [])
    rows = [
        ("train", "ranks x micro x accum", f"{a['world']} x 1 x {a['grad_accum']}", "train's world size line"),
        ("train", "tokens/s per GPU", _fmt(rate, ",.0f") + (f" (MFU {a['mfu']:.3f})" if a["mfu"] else ""),
         f"median of log.jsonl steps > {WARMUP_STEPS}, run A"),
        ("train", "GPU-hours per billion tokens", _fmt(_per_billion(rate), ",.2f"), "run A"),
        ("train", "peak GPU memory", _fmt(a["peak_mem_gib"], ".2f", " GiB"),
         "log.jsonl peak_mem_gib (CPU: rank-0 RSS)" + (f"; nvidia-smi {a['peak_device_gib']:.1f} GiB"
                                                      if a["peak_device_gib"] else "")),
        ("train", "peak host memory", _fmt(a["peak_host_gib"], ".2f", " GiB"), "process tree PSS, sampled"),
        ("train", "time to first step", _fmt(a["time_to_first_step_s"], ".1f", " s"),
         f"process start -> first train record (build {_fmt(a['startup_s'], '.1f', ' s')}, then step-0 eval)"),
        ("train", "checkpoint size", _fmt(a["checkpoint"]["bytes"] / 1e9 if a["checkpoint"] else None, ",.3f", " GB"),
         f"du {a['checkpoint']['dir'] if a['checkpoint'] else ''}"),
        ("train", "checkpoint save / load", (f"{_fmt(max(saves, default=None), '.2f', ' s')} / "
                                             f"{_fmt(max(loads, default=None), '.2f', ' s')}"),
         "slowest save of runs A and C / C's resume"),
        ("train", "export write / load / forward",
         (f"{_fmt(exported.get('export_write_s'), '.2f', ' s')} / {_fmt(export.get('load_s'), '.2f', ' s')} / "
          f"{_fmt(export.get('forward_s'), '.3f', ' s')}"),
         f"run {export.get('run', 'A')}'s train log; from_pretrained; 16 tokens"),
        ("train", "export forward finite", str(export.get("finite", "not run")),
         f"logits {export.get('logits_shape', '')}"),
        ("train", "scaling 1 -> N GPUs (per-GPU rate)", _fmt(scaling, ".3f"),
         "run A vs one rank" if scaling else one.get("status", "train_1gpu not run")),
    ]
    if scaling_b is not None:
        rows.append(("train", "scaling 1 -> N GPUs (per-GPU rate)", _fmt(scaling_b, ".3f"), "run B vs one rank"))
    return rows + resume_rows(c, report_checks)


def resume_rows(c: dict, report_checks: dict) -> list[tuple[str, str, str, str]]:
    spread, resumed = report_checks.get("b_vs_a"), report_checks.get("c_vs_a")
    rows = [("train", "run-to-run spread: max abs(B - A) of the loss",
             _fmt(spread and spread["max_abs_diff"], ".3g") + (" (bitwise equal)" if spread and spread["bitwise_equal"]
                                                               else ""), "log.jsonl, every step")]
    if resumed:
        kill = c["kill"]
        rows += [
            ("train", "C killed", (f"at {kill['killed_at_s']:.1f} s, checkpoints {kill['checkpoints']}, "
                                   f"logged to step {kill['last_step_logged']}"), "SIGKILL to the process tree"),
            ("train", "resumed C: same steps as A", str(resumed["same_steps"]), f"{resumed['steps']} steps"),
            ("train", "resumed C: max abs(C - A) of the loss", _fmt(resumed["max_abs_diff"], ".3g")
             + (" (bitwise equal)" if resumed["bitwise_equal"] else ""),
             f"eval max abs(C - A) {_fmt(report_checks['c_vs_a_eval']['max_abs_diff'], '.3g')}"),
        ]
        if "c_vs_b" in report_checks:
            rows.append(("train", "resumed C: max abs(C - B) of the loss",
                         _fmt(report_checks["c_vs_b"]["max_abs_diff"], ".3g"), "log.jsonl, every step"))
    return rows


def from_export_rows(result: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for key in sorted((k for k in result if k.startswith("ranks_")), key=lambda k: -int(k.split("_")[1])):
        r = result[key]
        rows.append(("from export", f"{r['world']} rank(s): build / first step / peak host",
                     (f"{_fmt(r['startup_s'], '.1f', ' s')} / {_fmt(r['time_to_first_step_s'], '.1f', ' s')} / "
                      f"{_fmt(r['peak_host_gib'], '.2f', ' GiB')}"),
                     f"student.path = run {result['export_run']}'s export; process tree PSS, sampled"))
    return rows


def format_table(report: dict) -> str:
    stages = report["stages"]
    autotune = stages.get("autotune", {})
    rows = cache_rows(stages)
    if "plans" in autotune:
        plans = "; ".join(f"GBS {p['target_gbs']}: micro {p['micro_batch']} x accum {p['grad_accum']}"
                          for p in autotune["plans"])
        rows.append(("autotune", f"largest micro batch at {autotune['seq_len']} tokens",
                     f"{autotune['max_micro_batch']}" + (" (cap)" if autotune["capped"] else ""),
                     f"{autotune['world_size']} ranks; {plans}"))
    rows += train_rows(stages, report["checks"])
    rows += from_export_rows(stages.get("from_export", {}))
    header = [f"Rehearsal on {report['card']}, {report['date']}", "",
              "| stage | figure | value | from |", "|---|---|---|---|"]
    return "\n".join(header + [f"| {' | '.join(row)} |" for row in rows])

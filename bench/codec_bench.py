"""Shard codec benchmark: bytes/token, encode/decode speed on one core, and the
KL error of decoded top-k targets.

    .venv/bin/python bench/codec_bench.py            # V = 201,088, 2 rows x 4096 tokens per id order

For each id order of the synthetic teacher (demo/peaked_teacher.py: `clustered`
puts frequent tokens at small ids as BPE vocabularies roughly do, `scattered` spreads
them over the vocabulary at random), it writes real shards with ShardWriter
and reads them back with ShardReader, single-threaded (torch and Arrow pinned
to one thread, best of --repeats runs), and reports:

* bytes/token of the target columns (topk_ids, topk_values, topk_max, lse, or
  sample_*), and of the whole file (with input_ids, labels, row keys);
* encode and decode MB/s, counting the arrays the reader returns (int64 ids,
  float32 logits and lse; int64 sampled ids/counts/sizes; float32 hidden), and
  tokens/s;
* mean KL(exact || decoded) over the k kept ids plus one tail bucket, at each
  stored temperature, exact side in float64 from the generator's logits.

Hidden states (D = 2880 by default) are Gaussian with 1/64 of the channels
20x larger, like the residual stream's outlier channels; bf16 vs fp8 bytes/token.
Prints markdown tables (docs/BENCHMARKS.md records them).

Shape suffixes: P positions, V vocabulary, K top-k width, T temperatures,
S flattened sampled entries, H hidden tokens, D hidden size.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.inspect import column_bytes  # noqa: E402
from common.shard_format import TeacherRow  # noqa: E402
from common.shard_reader import ShardReader  # noqa: E402
from common.shard_writer import DEFAULT_ZSTD_LEVEL, ShardWriter  # noqa: E402
from common.spec import HiddenSpec, ShardSpec, TargetSpec  # noqa: E402
from common.targets.sampled import SampledRowTargets  # noqa: E402
from common.targets.topk import TopkRowTargets  # noqa: E402
from demo.peaked_teacher import (PeakedConfig, hidden_like, lse_float64, peaked_logits,  # noqa: E402
                                 sample_counts, topk_tail_kl)
from teacher_cache.targets import row_uniforms  # noqa: E402

TEMPERATURES = (1.0, 2.0)
GEN_CHUNK = 256  # positions per generated [chunk, V] logits block
DISTILLKIT_BYTES = {128: 344, 50: 127}  # their published bytes/token (design notes, section 3)


@dataclass
class ExactRow:
    """One generated row: exact top-kmax targets (sorted by logit, descending) and sampled draws."""

    row_id: int
    input_ids_L: np.ndarray
    ids_PK: np.ndarray
    logits_PK: np.ndarray
    lse_PT: np.ndarray  # float64
    sample_ids_S: np.ndarray
    sample_counts_S: np.ndarray
    sample_sizes_P: np.ndarray


def generate_row(row_id: int, length: int, vocab_size: int, k_max: int, num_samples: int,
                 config: PeakedConfig, seed: int) -> ExactRow:
    num_pos = length - 1
    ids, logits, lse, s_ids, s_counts, s_sizes = [], [], [], [], [], []
    uniforms_PM = row_uniforms(seed, row_id, num_pos, num_samples)
    for start in range(0, num_pos, GEN_CHUNK):
        n = min(GEN_CHUNK, num_pos - start)
        logits_nV = peaked_logits(n, vocab_size, seed=seed * 100_003 + row_id * 1009 + start, config=config)
        vals_nK, ids_nK = torch.from_numpy(logits_nV).topk(k_max, dim=1)
        ids.append(ids_nK.numpy().astype(np.int64))
        logits.append(vals_nK.numpy())
        lse.append(lse_float64(logits_nV, TEMPERATURES))
        a, b, c = sample_counts(logits_nV, uniforms_PM[start:start + n])
        s_ids.append(a)
        s_counts.append(b)
        s_sizes.append(c)
    ids_PK = np.concatenate(ids)
    input_ids_L = np.empty(length, dtype=np.int32)
    input_ids_L[0] = row_id % vocab_size
    input_ids_L[1:] = ids_PK[:, 0]  # greedy: target t describes token t + 1
    return ExactRow(row_id, input_ids_L, ids_PK, np.concatenate(logits), np.concatenate(lse),
                    np.concatenate(s_ids), np.concatenate(s_counts), np.concatenate(s_sizes))


def teacher_row(exact: ExactRow, spec: ShardSpec) -> TeacherRow:
    row = TeacherRow(row_id=exact.row_id, input_ids_L=exact.input_ids_L, labels_L=exact.input_ids_L.copy())
    if spec.targets.mode == "topk":
        k = spec.targets.k
        row.targets = TopkRowTargets(ids_PK=exact.ids_PK[:, :k], logits_PK=exact.logits_PK[:, :k],
                                     lse_PT=exact.lse_PT.astype(np.float32))
    else:
        row.targets = SampledRowTargets(sizes_P=exact.sample_sizes_P, ids_S=exact.sample_ids_S,
                                        counts_S=exact.sample_counts_S)
    return row


def decoded_nbytes(row: TeacherRow) -> int:
    """Bytes of the arrays the reader hands back (what MB/s counts)."""
    arrays = [getattr(row.targets, f.name) for f in dataclasses.fields(row.targets)] if row.targets else []
    return sum(a.nbytes for a in arrays) + sum(h.numel() * 4 for h in row.hidden.values())


def write_and_read(directory: Path, spec: ShardSpec, rows: list[TeacherRow], zstd_level: int,
                   columns: list[str], repeats: int) -> dict:
    """Encode+write one shard, read+decode it back; best time of `repeats`, and bytes."""
    path = directory / "shard-00000.arrow"
    encode_s = decode_s = float("inf")
    for _ in range(repeats):
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        writer = ShardWriter(directory, 0, spec, 0, len(rows), zstd_level=zstd_level)
        for row in rows:
            writer.add(row)
        writer.close()
        encode_s = min(encode_s, time.perf_counter() - start)
        start = time.perf_counter()
        with ShardReader(path, columns=columns) as reader:
            decoded = list(reader.iter_rows())
        decode_s = min(decode_s, time.perf_counter() - start)
    stored = {c.name: c.compressed for c in column_bytes(path)}
    tokens = sum(len(r.input_ids_L) for r in rows)
    nbytes = sum(decoded_nbytes(r) for r in decoded)
    out = {"decoded": decoded, "tokens": tokens, "file_per_token": path.stat().st_size / tokens,
           "encode_mb_s": nbytes / encode_s / 1e6, "decode_mb_s": nbytes / decode_s / 1e6,
           "encode_tok_s": tokens / encode_s, "decode_tok_s": tokens / decode_s,
           "stored": {name: n / tokens for name, n in stored.items()}}
    path.unlink()
    (directory / "shard-00000.arrow.json").unlink()
    return out


def topk_kl(exact_rows: list[ExactRow], decoded: list[TeacherRow], k: int) -> list[float]:
    """Mean KL(exact || decoded) with a tail bucket, per stored temperature."""
    kls = [[] for _ in TEMPERATURES]
    for exact, row in zip(exact_rows, decoded):
        order_PK = np.argsort(exact.ids_PK[:, :k], axis=1)  # decoded ids are ascending
        ids_PK = np.take_along_axis(exact.ids_PK[:, :k], order_PK, axis=1)
        assert np.array_equal(ids_PK, row.targets.ids_PK), "ids must round-trip exactly"
        true_PK = np.take_along_axis(exact.logits_PK[:, :k], order_PK, axis=1)
        for ti, t in enumerate(TEMPERATURES):
            kls[ti].append(topk_tail_kl(true_PK, exact.lse_PT[:, ti], row.targets.logits_PK, row.targets.lse_PT[:, ti],
                                        t))
    return [float(np.concatenate(parts).mean()) for parts in kls]


def bench_targets(args, config: PeakedConfig, label: str, directory: Path) -> list[dict]:
    k_max = max(args.ks)
    t0 = time.perf_counter()
    exact_rows = [generate_row(r, args.tokens_per_row, args.vocab, k_max, args.samples, config, args.seed)
                  for r in range(args.rows)]
    print(f"[{label}] generated {args.rows} x {args.tokens_per_row} tokens in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    results = []
    for k in args.ks:
        spec = ShardSpec(vocab_size=args.vocab, targets=TargetSpec(mode="topk", k=k, temperatures=TEMPERATURES))
        rows = [teacher_row(e, spec) for e in exact_rows]
        cols = ["input_ids", "topk_ids", "topk_values", "topk_max", "lse"]
        for level in sorted({args.zstd_level, *(args.levels if k == args.levels_k else ())}):
            r = write_and_read(directory, spec, rows, level, cols, args.repeats)
            r.update(ids=label, targets=f"top-{k}", k=k, level=level,
                     target_per_token=sum(r["stored"][c] for c in cols[1:]),
                     kl=topk_kl(exact_rows, r.pop("decoded"), k))
            results.append(r)
    spec = ShardSpec(vocab_size=args.vocab, targets=TargetSpec(mode="sampled", num_samples=args.samples,
                                                               seed=args.seed))
    rows = [teacher_row(e, spec) for e in exact_rows]
    cols = ["input_ids", "sample_sizes", "sample_ids", "sample_counts"]
    r = write_and_read(directory, spec, rows, args.zstd_level, cols, args.repeats)
    for row, dec in zip(rows, r.pop("decoded")):
        assert np.array_equal(row.targets.ids_S, dec.targets.ids_S) and np.array_equal(row.targets.counts_S,
                                                                                        dec.targets.counts_S)
    r.update(ids=label, targets=f"sampled N={args.samples}", k=None, level=args.zstd_level,
             target_per_token=sum(r["stored"][c] for c in cols[1:]), kl=None,
             distinct=float(np.mean([e.sample_sizes_P.mean() for e in exact_rows])))
    results.append(r)
    return results


def bench_hidden(args, directory: Path) -> list[dict]:
    results = []
    hidden_LD = hidden_like(args.hidden_tokens, args.hidden_dim, seed=args.seed)
    input_ids = np.zeros(args.hidden_tokens, dtype=np.int32)
    for dtype in ("bf16", "fp8"):
        spec = ShardSpec(vocab_size=args.vocab, targets=TargetSpec(mode="topk", k=1, temperatures=(1.0,)),
                         hidden=HiddenSpec(layers=(1,), dtype=dtype, hidden_size=args.hidden_dim))
        num_pos = args.hidden_tokens - 1
        row = TeacherRow(row_id=0, input_ids_L=input_ids, labels_L=input_ids,
                         targets=TopkRowTargets(ids_PK=np.zeros((num_pos, 1), np.int64),
                                                logits_PK=np.zeros((num_pos, 1), np.float32),
                                                lse_PT=np.ones((num_pos, 1), np.float32)), hidden={1: hidden_LD})
        cols = ["input_ids", "hidden_1"] + (["hidden_1_scale"] if dtype == "fp8" else [])
        r = write_and_read(directory, spec, [row], args.zstd_level, cols, args.repeats)
        decoded = r.pop("decoded")[0].hidden[1]
        # Speed counts the hidden arrays alone (the dummy targets are tiny).
        err = (decoded.double() - hidden_LD.double()).norm() / hidden_LD.double().norm()
        stored = sum(r["stored"][c] for c in cols[1:])
        raw = (2 if dtype == "bf16" else 1) * args.hidden_dim + (4 if dtype == "fp8" else 0)
        results.append({"dtype": dtype, "per_token": stored, "raw_per_token": raw, "ratio": raw / stored,
                        "rel_l2": float(err), "encode_mb_s": r["encode_mb_s"], "decode_mb_s": r["decode_mb_s"]})
    return results


def print_tables(target_results: list[dict], hidden_results: list[dict], args) -> None:
    print(f"\nV = {args.vocab:,}; {args.rows} rows x {args.tokens_per_row} tokens per id order; "
          f"temperatures {TEMPERATURES}; zstd level {args.zstd_level} unless stated\n")
    print("| ids | targets | zstd | target B/token | file B/token | DistillKit B/token | encode MB/s | "
          "decode MB/s | encode tok/s | decode tok/s | mean KL T=1 | mean KL T=2 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in target_results:
        kl = ("lossless", "lossless") if r["kl"] is None else tuple(f"{x:.2e}" for x in r["kl"])
        ref = DISTILLKIT_BYTES.get(r["k"], "")
        note = f" ({r['distinct']:.1f} distinct)" if r.get("distinct") else ""
        print(f"| {r['ids']} | {r['targets']}{note} | {r['level']} | {r['target_per_token']:.1f} | "
              f"{r['file_per_token']:.1f} | {ref} | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} | "
              f"{r['encode_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | {kl[0]} | {kl[1]} |")
    print(f"\nHidden states, D = {args.hidden_dim}, {args.hidden_tokens} tokens, one layer\n")
    print("| dtype | stored B/token | raw B/token | zstd ratio | rel. L2 error | encode MB/s | decode MB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in hidden_results:
        print(f"| {r['dtype']} | {r['per_token']:.0f} | {r['raw_per_token']} | {r['ratio']:.2f} | "
              f"{r['rel_l2']:.2e} | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=201_088)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens-per-row", type=int, default=4096)
    parser.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[32, 50, 64, 128])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--ids", default="clustered,scattered", help="id orders to run: clustered, scattered")
    parser.add_argument("--zstd-level", type=int, default=DEFAULT_ZSTD_LEVEL)
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 9],
                        help="extra zstd levels tried at --levels-k")
    parser.add_argument("--levels-k", type=int, default=64)
    parser.add_argument("--hidden-dim", type=int, default=2880)
    parser.add_argument("--hidden-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # One core: per-core figures; Arrow would otherwise compress columns in parallel.
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    target_results = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        for label in args.ids.split(","):
            config = PeakedConfig(clustered_ids=(label == "clustered"))
            target_results += bench_targets(args, config, label, Path(tmp))
        hidden_results = bench_hidden(args, Path(tmp))
    print_tables(target_results, hidden_results, args)


if __name__ == "__main__":
    main()

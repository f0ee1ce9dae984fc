"""The training loader against caches written with the shard writer from synthetic teacher rows.

The synthetic teacher puts its largest logit at position t on token t+1, so "target t predicts
token t+1" can be checked on every batch without trusting the loader's own bookkeeping.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.causal_lm import IGNORE_INDEX
from common.manifest import MANIFEST_NAME
from common.shard_format import (CHECKSUM_COLUMN, ShardFormatError, TeacherRow, checksummed_columns, encode_row,
                                 row_checksums)
from common.shard_reader import ShardReader
from common.spec import HiddenSpec, ShardSpec, TargetSpec, hidden_positions
from common.targets.sampled import SampledBatchTargets, SampledRowTargets
from common.targets.topk import TopkRowTargets
from student_train.batch import StudentBatch
from student_train.loader import CacheLoader, LoaderConfig, plan_epoch
from synthetic_cache import write_cache_rows
from teacher_cache.targets import compute_targets, row_uniforms

VOCAB = 300
NEXT_TOKEN_BONUS = 10.0  # makes token t+1 the teacher's clear favourite at position t
TOPK_SPEC = ShardSpec(vocab_size=VOCAB, targets=TargetSpec(mode="topk", k=8, temperatures=(1.0, 2.0)),
                      hidden=HiddenSpec(layers=(2, 5), dtype="bf16", token_fraction=1.0, hidden_size=12))
SAMPLED_SPEC = ShardSpec(vocab_size=VOCAB, targets=TargetSpec(mode="sampled", num_samples=24, seed=3),
                         hidden=HiddenSpec(layers=(3,), dtype="fp8", token_fraction=0.5, hidden_size=10, seed=5))


# ---------------------------------------------------------------- synthetic caches


def synthetic_row(row_id: int, length: int, spec: ShardSpec, rng: np.random.Generator) -> TeacherRow:
    input_ids = rng.integers(1, VOCAB, size=length).astype(np.int32)
    labels = input_ids.copy()
    labels[: rng.integers(0, length)] = IGNORE_INDEX  # a masked prompt prefix of random length
    logits_PV = torch.from_numpy(rng.normal(0.0, 1.5, size=(length - 1, VOCAB)).astype(np.float32))
    logits_PV[torch.arange(length - 1), torch.from_numpy(input_ids[1:].astype(np.int64))] += NEXT_TOKEN_BONUS
    row = TeacherRow(row_id=row_id, input_ids_L=input_ids, labels_L=labels)
    if spec.targets.mode == "topk":
        t = compute_targets(logits_PV, lambda x: x, spec.targets, chunk_size=16)
        row.targets = TopkRowTargets(ids_PK=t.topk_ids_NK.numpy(), logits_PK=t.topk_logits_NK.numpy(),
                                     lse_PT=t.lse_NT.numpy())
    else:
        uniforms = torch.from_numpy(row_uniforms(spec.targets.seed, row_id, length - 1, spec.targets.num_samples))
        t = compute_targets(logits_PV, lambda x: x, spec.targets, uniforms_NM=uniforms, chunk_size=16)
        row.targets = SampledRowTargets(sizes_P=t.sample_sizes_N.numpy(), ids_S=t.sample_ids_S.numpy(),
                                        counts_S=t.sample_counts_S.numpy())
    h = spec.hidden
    if h.layers:
        positions = hidden_positions(row_id, length, h.token_fraction, h.seed)
        row.hidden_positions_H = positions
        row.hidden = {layer: torch.from_numpy(rng.normal(size=(len(positions), h.hidden_size)).astype(np.float32))
                      for layer in h.layers}
    return row


def write_cache(cache_dir: Path, spec: ShardSpec, rows: list[TeacherRow], rows_per_shard: int,
                batch_rows: int = 4, corrupt_row_id: int | None = None) -> Path:
    def encode(row: TeacherRow, spec: ShardSpec) -> dict:
        cells = encode_row(row, spec)
        if row.row_id == corrupt_row_id:
            # tokens that no longer match the stored content hash, as from other data
            cells["input_ids"] = cells["input_ids"].copy()
            cells["input_ids"][0] = (cells["input_ids"][0] + 1) % VOCAB
            cells[CHECKSUM_COLUMN] = row_checksums(cells, checksummed_columns(spec))  # written as given
        return cells

    shards = [rows[start:start + rows_per_shard] for start in range(0, len(rows), rows_per_shard)]
    return write_cache_rows(cache_dir, spec, shards, batch_rows=batch_rows, work={"rows_per_shard": rows_per_shard},
                            encode=encode)


def make_rows(spec: ShardSpec, lengths: list[int], seed: int) -> list[TeacherRow]:
    rng = np.random.default_rng(seed)
    # source row ids differ from the cache's row numbering, so a mix-up shows
    return [synthetic_row(7000 + 3 * i, n, spec, rng) for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory):
    lengths = [2, 30, 5, 17, 40, 9, 23, 3, 33, 12, 26, 7, 38, 15, 21, 11, 4, 29, 19, 36, 8, 14, 25]
    rows = make_rows(TOPK_SPEC, lengths, seed=1)
    return write_cache(tmp_path_factory.mktemp("topk"), TOPK_SPEC, rows, rows_per_shard=6), rows


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory):
    lengths = [13, 2, 27, 8, 19, 31, 5, 22, 16, 10, 25]
    rows = make_rows(SAMPLED_SPEC, lengths, seed=2)
    return write_cache(tmp_path_factory.mktemp("sampled"), SAMPLED_SPEC, rows, rows_per_shard=4), rows


def decoded_rows(cache_dir: Path) -> dict[int, TeacherRow]:
    """Every row as the shard reader decodes it (the loader must reproduce these exactly)."""
    out = {}
    for path in sorted(cache_dir.glob("shard-*.arrow")):
        with ShardReader(path) as reader:
            out.update({row.row_id: row for row in reader.iter_rows()})
    return out


def loader(cache_dir, **kw) -> CacheLoader:
    rank, world = kw.pop("rank", 0), kw.pop("world_size", 1)
    vocab = kw.pop("expected_vocab_size", None)
    kw.setdefault("seq_len", 64)
    return CacheLoader(LoaderConfig(cache_dir=str(cache_dir), **kw), rank=rank, world_size=world,
                       expected_vocab_size=vocab)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batch(a: StudentBatch, b: StudentBatch):
    pairs = [(name, getattr(a, name), getattr(b, name))
             for name in ("row_ids_B", "input_ids_BL", "attention_mask_BL", "labels_BL", "hidden_mask_BL")]
    assert type(a.targets) is type(b.targets)
    if a.targets is not None:
        pairs += [(f.name, getattr(a.targets, f.name), getattr(b.targets, f.name)) for f in dataclasses.fields(a.targets)]
    for name, x, y in pairs:
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.teacher_hidden.keys() == b.teacher_hidden.keys()
    assert a.teacher_hidden_scale.keys() == b.teacher_hidden_scale.keys()
    for layer in a.teacher_hidden:
        assert a.teacher_hidden[layer].dtype == b.teacher_hidden[layer].dtype
        assert torch.equal(a.teacher_hidden[layer], b.teacher_hidden[layer])
        assert torch.equal(a.hidden_float(layer), b.hidden_float(layer))
    assert a.num_tokens == b.num_tokens


def real_row_ids(batches) -> list[int]:
    return [int(r) for batch in batches for r in batch.row_ids_B if r >= 0]


# ---------------------------------------------------------------- contents


def check_common(batch: StudentBatch, b: int, row: TeacherRow, original: TeacherRow):
    n = row.num_tokens
    L = batch.seq_len
    assert int(batch.row_ids_B[b]) == row.row_id
    assert torch.equal(batch.input_ids_BL[b, :n], torch.from_numpy(original.input_ids_L.astype(np.int64)))
    assert (batch.input_ids_BL[b, n:] == 0).all()
    assert batch.attention_mask_BL[b].tolist() == [1] * n + [0] * (L - n)
    assert torch.equal(batch.labels_BL[b, :n], torch.from_numpy(original.labels_L.astype(np.int64)))
    assert (batch.labels_BL[b, n:] == IGNORE_INDEX).all()


def test_topk_batches_reproduce_rows_with_target_t_predicting_token_t_plus_1(topk_cache):
    cache_dir, originals = topk_cache
    reference = decoded_rows(cache_dir)
    by_id = {r.row_id: r for r in originals}
    ld = loader(cache_dir, micro_batch=3, hidden_layers=(2, 5), expected_vocab_size=VOCAB, seed=4)
    batches = list(ld.epoch_batches())
    ld.close()
    assert len(batches) == ld.batches_per_epoch == len(originals) // 3
    seen = real_row_ids(batches)
    assert len(seen) == len(set(seen)) == 3 * ld.batches_per_epoch

    for batch in batches:
        B, L = batch.input_ids_BL.shape
        P = L - 1
        assert batch.targets.ids_BPK.shape == (B, P, 8) and batch.targets.ids_BPK.dtype == torch.int64
        assert batch.targets.logits_BPK.shape == (B, P, 8) and batch.targets.logits_BPK.dtype == torch.float32
        assert batch.targets.lse_BPT.shape == (B, P, 2) and batch.targets.lse_BPT.dtype == torch.float32
        assert L == max(reference[int(r)].num_tokens for r in batch.row_ids_B)
        assert batch.num_tokens == int(batch.attention_mask_BL.sum())
        for b in range(B):
            row, original = reference[int(batch.row_ids_B[b])], by_id[int(batch.row_ids_B[b])]
            n, p = row.num_tokens, row.num_positions
            check_common(batch, b, row, original)
            # stored target t sits at batch position t (no shift in the loader) ...
            assert torch.equal(batch.targets.ids_BPK[b, :p], torch.from_numpy(row.targets.ids_PK))
            assert torch.equal(batch.targets.logits_BPK[b, :p], torch.from_numpy(row.targets.logits_PK))
            assert torch.equal(batch.targets.lse_BPT[b, :p], torch.from_numpy(original.targets.lse_PT))  # lossless
            want_ids = torch.from_numpy(np.sort(original.targets.ids_PK, axis=1))
            assert torch.equal(batch.targets.ids_BPK[b, :p].sort(1).values, want_ids)  # same ids per position
            # ... and it predicts token t+1: the teacher's favourite id is the next input token
            top1_p = batch.targets.ids_BPK[b, :p].gather(1, batch.targets.logits_BPK[b, :p].argmax(1, keepdim=True))[:, 0]
            assert torch.equal(top1_p, batch.input_ids_BL[b, 1:n])
            # the loss counts target t where labels[t+1] is set: those are exactly the unmasked next tokens
            valid_p = batch.labels_BL[b, 1:n] != IGNORE_INDEX
            assert torch.equal(top1_p[valid_p], batch.labels_BL[b, 1:n][valid_p])
            assert (batch.targets.ids_BPK[b, p:] == 0).all() and (batch.targets.logits_BPK[b, p:] == 0).all()
            assert (batch.targets.lse_BPT[b, p:] == 0).all()
            # hidden states are not shifted; fraction 1 stores every real token
            assert batch.hidden_mask_BL[b].tolist() == [True] * n + [False] * (L - n)
            for layer in (2, 5):
                h_LD = batch.hidden_float(layer)[b]
                assert torch.equal(h_LD[:n], row.hidden[layer])
                assert torch.allclose(h_LD[:n], original.hidden[layer], rtol=1e-2, atol=1e-2)
                assert (h_LD[n:] == 0).all()


def test_sampled_batches_and_hidden_subset(sampled_cache):
    cache_dir, originals = sampled_cache
    reference = decoded_rows(cache_dir)
    by_id = {r.row_id: r for r in originals}
    ld = loader(cache_dir, micro_batch=2, hidden_layers=(3,), shuffle=False)
    batches = list(ld.epoch_batches())
    ld.close()
    assert sorted(real_row_ids(batches)) == sorted(by_id)
    assert ld.spec.targets.num_samples == 24
    for batch in batches:
        B, L = batch.input_ids_BL.shape
        M = batch.targets.ids_BPM.shape[2]
        assert isinstance(batch.targets, SampledBatchTargets)  # no top-k fields
        assert batch.targets.ids_BPM.shape == batch.targets.counts_BPM.shape == (B, L - 1, M)
        assert M == max(int(reference[abs(int(r))].targets.sizes_P.max(initial=0)) for r in batch.row_ids_B if r >= 0)
        for b in range(B):
            if batch.row_ids_B[b] < 0:
                continue
            row, original = reference[int(batch.row_ids_B[b])], by_id[int(batch.row_ids_B[b])]
            n, p = row.num_tokens, row.num_positions
            check_common(batch, b, row, original)
            starts = np.concatenate([[0], np.cumsum(original.targets.sizes_P)])
            for t in range(p):
                ids = batch.targets.ids_BPM[b, t]
                counts = batch.targets.counts_BPM[b, t]
                size = int(original.targets.sizes_P[t])
                got = sorted(zip(ids[:size].tolist(), counts[:size].tolist()))
                want = sorted(zip(original.targets.ids_S[starts[t]:starts[t + 1]].tolist(),
                                  original.targets.counts_S[starts[t]:starts[t + 1]].tolist()))
                assert got == want
                assert (ids[size:] == -1).all() and (counts[size:] == 0).all()
                assert int(counts.sum()) == 24
                # the most drawn id at position t is token t+1
                assert int(ids[counts.argmax()]) == int(batch.input_ids_BL[b, t + 1])
            assert (batch.targets.ids_BPM[b, p:] == -1).all() and (batch.targets.counts_BPM[b, p:] == 0).all()
            # fraction 0.5: only the stored positions are marked and filled
            mask = torch.zeros(L, dtype=torch.bool)
            mask[torch.from_numpy(original.hidden_positions_H.astype(np.int64))] = True
            assert torch.equal(batch.hidden_mask_BL[b], mask)
            assert 0 < int(mask.sum()) < n or n < 3
            assert batch.teacher_hidden[3].dtype == torch.uint8  # fp8 bytes, dequantized on the device
            h = batch.hidden_float(3)[b]
            assert torch.equal(h[mask], row.hidden[3])
            assert torch.allclose(h[mask], original.hidden[3], rtol=0.07, atol=0.02)  # fp8 e4m3
            assert (h[~mask] == 0).all()


def test_only_requested_hidden_layers_are_read(topk_cache):
    cache_dir, _ = topk_cache
    with loader(cache_dir, micro_batch=2, hidden_layers=(5,)) as ld:
        batch = next(iter(ld))
        assert list(batch.teacher_hidden) == [5]
        assert "hidden_2" not in ld._decoder.columns
    with loader(cache_dir, micro_batch=2) as ld:
        batch = next(iter(ld))
        assert batch.teacher_hidden == {} and batch.hidden_mask_BL is None


# ---------------------------------------------------------------- ranks, order, resume


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_rows_and_cover_the_cache(topk_cache, world_size):
    cache_dir, originals = topk_cache
    all_ids = sorted(r.row_id for r in originals)
    # shuffled: disjoint, equal batch counts, leftovers (< one global step) skipped for this epoch only
    per_rank = []
    for rank in range(world_size):
        with loader(cache_dir, micro_batch=2, rank=rank, world_size=world_size, seed=9) as ld:
            epochs = [list(ld.epoch_batches()) for _ in range(2)]
            assert all(len(e) == ld.batches_per_epoch for e in epochs)
            per_rank.append([real_row_ids(e) for e in epochs])
    assert len({len(r[0]) for r in per_rank}) == 1
    for epoch in range(2):
        ids = [i for r in per_rank for i in r[epoch]]
        assert len(ids) == len(set(ids)) == len(all_ids) - len(all_ids) % (2 * world_size)
    skipped = [set(all_ids) - {i for r in per_rank for i in r[epoch]} for epoch in range(2)]
    assert skipped[0] != skipped[1]

    # ordered (eval): every row exactly once; fillers complete the last step and count for nothing
    batches = []
    for rank in range(world_size):
        with loader(cache_dir, micro_batch=2, rank=rank, world_size=world_size, shuffle=False,
                    hidden_layers=(2,)) as ld:
            batches.append(list(ld.epoch_batches()))
            assert len(batches[-1]) == ld.batches_per_epoch == -(-len(all_ids) // (2 * world_size))
    flat = [b for rank_batches in batches for b in rank_batches]
    assert sorted(real_row_ids(flat)) == all_ids
    for batch in flat:
        for b in range(batch.batch_size):
            if batch.row_ids_B[b] < 0:
                assert (batch.labels_BL[b] == IGNORE_INDEX).all() and not batch.hidden_mask_BL[b].any()
                assert batch.attention_mask_BL[b].sum() > 0  # a real token stream, so the forward is ordinary
        assert batch.num_tokens == int(batch.attention_mask_BL[batch.row_ids_B >= 0].sum())


def test_order_depends_only_on_seed_and_epoch(topk_cache):
    cache_dir, _ = topk_cache
    runs = []
    for seed in (1, 1, 2):
        with loader(cache_dir, micro_batch=2, seed=seed, num_threads=1 + seed % 2, prefetch=1 + seed) as ld:
            runs.append([b.row_ids_B.tolist() for b in take(iter(ld), 2 * ld.batches_per_epoch)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    half = len(runs[0]) // 2
    assert runs[0][:half] != runs[0][half:]  # a new permutation each epoch


@pytest.mark.parametrize("consumed", ["mid_epoch", "last_of_epoch", "epoch_boundary", "second_epoch"])
def test_resume_yields_exactly_what_the_original_would(topk_cache, consumed):
    cache_dir, _ = topk_cache
    kw = dict(micro_batch=2, hidden_layers=(2,), seed=5, world_size=2, rank=1)
    original = loader(cache_dir, **kw)
    bpe = original.batches_per_epoch
    k = {"mid_epoch": bpe // 2, "last_of_epoch": bpe - 1, "epoch_boundary": bpe, "second_epoch": bpe + 2}[consumed]
    it = iter(original)
    take(it, k)
    state = json.loads(json.dumps(original.state_dict()))  # it travels in a checkpoint
    expected = take(it, bpe + 1)  # always crosses at least one epoch boundary
    original.close()

    restored = loader(cache_dir, **kw)
    restored.load_state_dict(state)
    got = take(iter(restored), bpe + 1)
    restored.close()
    for a, b in zip(expected, got):
        assert_same_batch(a, b)


def test_state_from_another_setup_is_refused(topk_cache):
    cache_dir, _ = topk_cache
    with loader(cache_dir, micro_batch=2, seed=1) as a, loader(cache_dir, micro_batch=3, seed=1) as b:
        with pytest.raises(ValueError, match="micro_batch"):
            b.load_state_dict(a.state_dict())
        with pytest.raises(ValueError, match="position"):
            a.load_state_dict({**a.state_dict(), "position": a.batches_per_epoch})


def test_eval_reads_the_first_rows_in_order_every_pass(topk_cache):
    cache_dir, originals = topk_cache
    with loader(cache_dir, micro_batch=2, max_samples=5, length_window=1) as ld:
        passes = [list(ld.epoch_batches()) for _ in range(2)]
    assert ld.batches_per_epoch == 3
    assert real_row_ids(passes[0]) == [r.row_id for r in originals[:5]]  # window 1 keeps cache order
    for a, b in zip(*passes):
        assert_same_batch(a, b)


# ---------------------------------------------------------------- length-aware batching


def padding_fraction(batches) -> float:
    real = sum(int(b.attention_mask_BL.sum()) for b in batches)
    total = sum(b.attention_mask_BL.numel() for b in batches)
    return 1 - real / total


def test_length_aware_batching_cuts_padding(tmp_path):
    rng = np.random.default_rng(11)
    lengths = np.clip(rng.lognormal(3.0, 0.8, size=160).astype(int), 2, 120).tolist()
    spec = ShardSpec(vocab_size=VOCAB, targets=TargetSpec(mode="topk", k=4, temperatures=(1.0,)))
    cache_dir = write_cache(tmp_path / "mixed", spec, make_rows(spec, lengths, seed=3), rows_per_shard=40)
    fractions = {}
    for window in (1, 16):  # window 1 = plain random batches
        with loader(cache_dir, micro_batch=8, length_window=window, seq_len=128) as ld:
            fractions[window] = padding_fraction(list(ld.epoch_batches()))
    print(f"padding fraction, micro batch 8, lognormal lengths: random {fractions[1]:.3f}, "
          f"length window 16 {fractions[16]:.3f}")
    assert fractions[16] < 0.35 * fractions[1]

    # the same on a production-sized order (plan only, no shards)
    lengths_N = np.clip(rng.lognormal(6.5, 0.9, size=20000).astype(int), 16, 4096)

    def plan_padding(world_size, window):
        plan = plan_epoch(lengths_N, 0, micro_batch=4, world_size=world_size, seed=0, shuffle=True,
                          length_window=window)
        rows_SWB = lengths_N[plan]
        return 1 - rows_SWB.sum() / (rows_SWB.max(-1, keepdims=True) * rows_SWB.shape[-1]).sum()

    # one rank, window 1: each micro batch is 4 random rows
    random_pad, windowed_pad = plan_padding(1, 1), plan_padding(8, 64)
    print(f"padding fraction, micro batch 4 x 8 ranks, 20k rows: random {random_pad:.3f}, window 64 {windowed_pad:.3f}")
    assert windowed_pad < 0.1 * random_pad


# ---------------------------------------------------------------- bad input


def test_vocab_mismatch_is_refused_before_any_batch(topk_cache):
    cache_dir, _ = topk_cache
    with pytest.raises(ValueError, match=rf"{cache_dir}.*{VOCAB}.*201088"):
        loader(cache_dir, expected_vocab_size=201088)


def test_missing_hidden_layer_is_refused(topk_cache):
    cache_dir, _ = topk_cache
    with pytest.raises(ValueError, match=r"layer\(s\) \[7\] not in the cache"):
        loader(cache_dir, hidden_layers=(2, 7))


def test_bad_manifest_is_refused(tmp_path, topk_cache):
    src, _ = topk_cache
    with pytest.raises(ShardFormatError, match="no manifest"):
        loader(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ShardFormatError, match="not valid JSON"):
        loader(tmp_path)
    manifest = json.loads((src / MANIFEST_NAME).read_text())
    manifest["shards"][1]["rows"] += 1
    for shard in src.glob("shard-*.arrow"):
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"shard-00001\.arrow: holds 6 rows, manifest says 7"):
        loader(tmp_path)
    manifest["shards"][1]["rows"] -= 1
    manifest["shards"][1]["file"] = "../elsewhere.arrow"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match="outside the cache directory"):
        loader(tmp_path)


def test_row_longer_than_seq_len_names_shard_and_row(topk_cache):
    cache_dir, originals = topk_cache
    longest = max(originals, key=lambda r: r.num_tokens)
    shard = originals.index(longest) // 6
    with pytest.raises(ValueError, match=rf"shard-{shard:05d}\.arrow: row {longest.row_id} has 40 tokens"):
        loader(cache_dir, seq_len=39)


def test_corrupted_row_names_shard_and_row_from_the_decode_thread(tmp_path):
    rows = make_rows(TOPK_SPEC, [6, 9, 4, 7, 5], seed=8)
    cache_dir = write_cache(tmp_path / "bad", TOPK_SPEC, rows, rows_per_shard=3, corrupt_row_id=rows[4].row_id)
    with loader(cache_dir, micro_batch=1, shuffle=False, length_window=1) as ld:
        it = ld.epoch_batches()
        assert real_row_ids(take(it, 4)) == [r.row_id for r in rows[:4]]
        with pytest.raises(ShardFormatError, match=rf"shard-00001\.arrow: row {rows[4].row_id}: content hash"):
            next(it)
    with loader(cache_dir, micro_batch=1, shuffle=False, verify_content=False) as ld:
        assert len(list(ld.epoch_batches())) == 5


def test_read_failure_in_a_decode_thread_names_shard_and_row(topk_cache, monkeypatch):
    cache_dir, originals = topk_cache

    def failing_read(self, index, **kwargs):
        raise OSError("input/output error")

    with loader(cache_dir, micro_batch=1, shuffle=False, length_window=1) as ld:
        monkeypatch.setattr(ShardReader, "read_row", failing_read)
        with pytest.raises(RuntimeError, match=rf"shard-00000\.arrow: row {originals[0].row_id}: OSError"):
            next(iter(ld))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="micro_batch"):
        LoaderConfig(cache_dir="x", micro_batch=0)
    with pytest.raises(ValueError, match="max_samples"):
        LoaderConfig(cache_dir="x", max_samples=0)
    with pytest.raises(ValueError, match="decode_processes"):
        LoaderConfig(cache_dir="x", decode_processes=-1)


# ---------------------------------------------------------------- threads and devices


def loader_threads(ld) -> list[threading.Thread]:
    prefix = f"vpmoe-loader-{id(ld):x}"
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def wait_gone(threads, timeout=5.0):
    deadline = time.monotonic() + timeout
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not any(t.is_alive() for t in threads)


def test_threads_stop_on_close_and_on_garbage_collection(topk_cache):
    cache_dir, _ = topk_cache
    ld = loader(cache_dir, micro_batch=2, num_threads=2, prefetch=3)
    it = iter(ld)
    take(it, 2)
    threads = loader_threads(ld)
    assert threads and all(t.is_alive() for t in threads)
    ld.close()
    assert wait_gone(threads)
    with pytest.raises(RuntimeError, match="closed"):
        next(iter(ld))

    ld = loader(cache_dir, micro_batch=2, num_threads=2, prefetch=3)
    it = iter(ld)
    take(it, 2)
    threads = loader_threads(ld)
    del ld, it
    gc.collect()
    assert wait_gone(threads)


def test_batch_moves_between_devices(topk_cache):
    cache_dir, _ = topk_cache
    with loader(cache_dir, micro_batch=2, hidden_layers=(2,)) as ld:
        assert not ld._decoder.pin_memory or torch.cuda.is_available()
        batch = next(iter(ld))
    moved = batch.to("cpu")
    assert_same_batch(batch, moved)
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.input_ids_BL.is_pinned() and pinned.teacher_hidden[2].is_pinned()
        assert_same_batch(pinned.to("cuda", non_blocking=True).to("cpu"), batch)


def test_fp8_batch_moves_with_its_scales(sampled_cache):
    """fp8 hidden states travel as bytes with per-token scales (dequantized on the
    device), so moving a batch must carry the scales along."""
    cache_dir, _ = sampled_cache
    with loader(cache_dir, micro_batch=2, hidden_layers=(3,), shuffle=False) as ld:
        batch = next(iter(ld))
    assert batch.teacher_hidden[3].dtype == torch.uint8 and list(batch.teacher_hidden_scale) == [3]
    assert_same_batch(batch, batch.to("cpu"))
    if torch.cuda.is_available():
        assert_same_batch(batch.pin_memory().to("cuda", non_blocking=True).to("cpu"), batch)


# ---------------------------------------------------------------- decode processes


@pytest.mark.parametrize("which", ["topk", "sampled"])
def test_decode_processes_give_the_batches_threads_give(topk_cache, sampled_cache, which):
    cache_dir, _ = topk_cache if which == "topk" else sampled_cache
    with loader(cache_dir, micro_batch=2, seed=4) as ld:
        expected = take(iter(ld), 9)  # more than one epoch
    with loader(cache_dir, micro_batch=2, seed=4, decode_processes=2, prefetch=3) as ld:
        it = iter(ld)
        got = take(it, 4)
        state = ld.state_dict()
        got += take(it, 5)
        assert all(b.input_ids_BL.is_shared() for b in got)  # built in a decode process's shared memory
        processes = list(ld._processes._processes.values())
        assert len(processes) == 2 and all(p.is_alive() for p in processes)
    assert not any(p.is_alive() for p in processes)  # close() stopped them
    for a, b in zip(expected, got, strict=True):
        assert_same_batch(a, b)
    with loader(cache_dir, micro_batch=2, seed=4, decode_processes=1) as ld:  # resume from a process loader's state
        ld.load_state_dict(state)
        for a, b in zip(expected[4:], take(iter(ld), 5), strict=True):
            assert_same_batch(a, b)


def test_corrupted_row_names_shard_and_row_from_a_decode_process(tmp_path):
    rows = make_rows(TOPK_SPEC, [6, 9, 4, 7, 5], seed=8)
    cache_dir = write_cache(tmp_path / "bad", TOPK_SPEC, rows, rows_per_shard=3, corrupt_row_id=rows[4].row_id)
    with loader(cache_dir, micro_batch=1, shuffle=False, length_window=1, decode_processes=1) as ld:
        it = ld.epoch_batches()
        assert real_row_ids(take(it, 4)) == [r.row_id for r in rows[:4]]
        with pytest.raises(ShardFormatError, match=rf"shard-00001\.arrow: row {rows[4].row_id}: content hash"):
            next(it)


def test_a_killed_decode_process_is_a_clear_error(topk_cache):
    cache_dir, _ = topk_cache
    with loader(cache_dir, micro_batch=1, decode_processes=1, prefetch=1) as ld:
        it = iter(ld)
        next(it)
        for process in ld._processes._processes.values():
            process.kill()
        with pytest.raises(RuntimeError, match="decode process died"):
            take(it, 3)

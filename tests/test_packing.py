"""Sequence packing: bins hold every row once, packed rows come out of the model and the
loss exactly as they do alone (float64), and the loader places every row's tokens,
labels, targets and hidden states at its offset with the boundary masked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import student_train.packing
from common.causal_lm import IGNORE_INDEX
from demo.tiny_models import build_model, tiny_gpt_oss_config, tiny_llama_config
from student_train.loader import CacheLoader, LoaderConfig
from student_train.losses import LossConfig
from student_train.model import DistillModel, TargetLayout
from student_train.packing import (EMPTY, check_packed_attention, pack_rows, packed_inputs, packed_position_ids,
                                   plan_packed_epoch)
from train_fixtures import VOCAB, make_rows, tiny_teacher, write_cache

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN = 64


def rows_of(bins_GR):
    return [int(n) for n in bins_GR.ravel() if n != EMPTY]


@pytest.mark.parametrize("shuffle", [True, False])
def test_bins_hold_every_row_once_within_seq_len(shuffle):
    rng = np.random.default_rng(0)
    lengths_N = np.exp(rng.uniform(np.log(16), np.log(4096), size=5000)).astype(np.int64)
    bins_GR = pack_rows(lengths_N, 4096, seed=3, shuffle=shuffle)
    assert sorted(rows_of(bins_GR)) == list(range(len(lengths_N)))
    sums_G = np.where(bins_GR == EMPTY, 0, lengths_N[np.where(bins_GR == EMPTY, 0, bins_GR)]).sum(1)
    assert (sums_G <= 4096).all() and (sums_G > 0).all()
    # best fit decreasing leaves little room on a log-uniform mix (padded, one row per batch
    # row, the same rows would fill about a third of the tokens)
    assert lengths_N.sum() / (len(bins_GR) * 4096) > 0.95
    assert np.array_equal(bins_GR, pack_rows(lengths_N, 4096, seed=3, shuffle=shuffle))


def test_best_fit_fills_the_tightest_bin():
    lengths_N = np.array([8, 6, 3, 1])
    # longest first: 8 and 6 open bins (room 2 and 4); 3 fits only the second (room 1 left);
    # 1 then goes to the tightest bin that fits, the second, not the first as first fit would
    bins_GR = pack_rows(lengths_N, 10, seed=0, shuffle=False)
    assert sorted(sorted(rows_of(b[None])) for b in bins_GR) == [[0], [1, 2, 3]]


def test_epoch_plans_permute_bins_and_complete_ordered_steps():
    bins_GR = np.arange(22).reshape(11, 2)
    shuffled = plan_packed_epoch(bins_GR, 0, micro_batch=2, world_size=2, seed=1, shuffle=True)
    assert shuffled.shape == (2, 2, 2, 2)  # 11 bins: 2 steps of 4, 3 left for a later epoch
    other = plan_packed_epoch(bins_GR, 1, micro_batch=2, world_size=2, seed=1, shuffle=True)
    assert not np.array_equal(shuffled, other)
    ordered = plan_packed_epoch(bins_GR, 0, micro_batch=2, world_size=2, seed=1, shuffle=False)
    assert ordered.shape == (3, 2, 2, 2)
    assert rows_of(ordered) == list(range(22)) and (ordered.reshape(-1, 2)[11:] == EMPTY).all()


def test_position_ids_restart_per_row_and_for_the_pad_tail():
    assert packed_position_ids([3, 2], 8).tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert packed_position_ids([4, 4], 8).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


# ---------------------------------------------------------------- the model keeps rows apart


def student(attn: str, kind: str = "gpt_oss", dtype=torch.float64):
    if kind == "gpt_oss":  # sliding window 16 < the rows below: both layer kinds are exercised
        config = tiny_gpt_oss_config(VOCAB, hidden_size=32, num_layers=2)
        config._experts_implementation = "eager"
    else:
        config = tiny_llama_config(VOCAB, hidden_size=32, num_layers=2, intermediate_size=64)
    model = build_model(config, seed=3, dtype=dtype, lm_head_scale=4.0)
    model.config._attn_implementation = attn
    return model.eval()


# GPT-OSS under flex attention (its sinks) runs on GPUs only: the trainer checks it there at start.
@pytest.mark.parametrize("kind,attn", [("gpt_oss", "eager"), ("gpt_oss", "sdpa"), ("llama", "flex_attention"),
                                       ("llama", "sdpa")])
@torch.no_grad()
def test_packed_rows_equal_rows_alone_float64(kind, attn):
    # flex attention on CPUs takes float32 at most
    dtype, tol = (torch.float32, 2e-5) if attn == "flex_attention" else (torch.float64, 1e-9)
    model = student(attn, kind, dtype)
    gen = torch.Generator().manual_seed(0)
    lengths = [21, 9, 30]
    rows = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    pad = 4  # a pad tail, its own document
    packed_1L = torch.cat([*rows, torch.zeros(pad, dtype=torch.int64)])[None]
    positions_1L = torch.from_numpy(packed_position_ids(lengths, sum(lengths) + pad))[None]
    packed_LV = model(input_ids=packed_1L, use_cache=False, **packed_inputs(model, positions_1L)).logits[0]
    start = 0
    for ids in rows:
        alone_LV = model(input_ids=ids[None], use_cache=False).logits[0]
        torch.testing.assert_close(packed_LV[start:start + len(ids)], alone_LV, rtol=tol, atol=tol)
        start += len(ids)
    check_packed_attention(model, torch.device("cpu"))


def test_a_student_that_mixes_packed_rows_is_refused(monkeypatch):
    model = student("sdpa")
    check_packed_attention(model, torch.device("cpu"))
    # as a custom attention that ignores restarting positions would behave
    monkeypatch.setattr(student_train.packing, "packed_attention_masks", lambda *args: None)
    with pytest.raises(ValueError, match="data.pack"):
        check_packed_attention(model, torch.device("cpu"))


# ---------------------------------------------------------------- loader and loss


@pytest.fixture(scope="module", params=["topk", "sampled"])
def cache(request, tmp_path_factory):
    rows = make_rows(14, 5, 40, seed=4)
    mode = request.param
    out = tmp_path_factory.mktemp(f"pack-{mode}")
    with torch.no_grad():
        write_cache(out, rows, tiny_teacher(), mode=mode, hidden_layers=(2,), rows_per_shard=5)
    return out


def load(cache_dir, **kw):
    kw.setdefault("seq_len", SEQ_LEN)
    kw.setdefault("shuffle", False)
    return CacheLoader(LoaderConfig(cache_dir=str(cache_dir), num_threads=1, hidden_layers=(2,),
                                    pin_memory=False, **kw))


def test_loader_places_each_row_at_its_offset(cache):
    with load(cache, micro_batch=1) as plain:
        alone = {int(b.row_ids_B[0]): b for b in plain.epoch_batches()}
    with load(cache, micro_batch=2, pack=True) as packed:
        batches = list(packed.epoch_batches())
        bins_GR = packed._bins_GR
    seen = [int(r) for b in batches for r in b.row_ids_BR.ravel() if r >= 0]
    assert sorted(seen) == sorted(alone) and len(bins_GR) < len(alone)
    for batch in batches:
        assert batch.input_ids_BL.shape == (2, SEQ_LEN) and batch.position_ids_BL.shape == (2, SEQ_LEN)
        for b in range(batch.batch_size):
            start = 0
            for row_id in (int(r) for r in batch.row_ids_BR[b] if r >= 0):
                ref = alone[row_id]
                n = int(ref.attention_mask_BL.sum())
                span = slice(start, start + n)
                assert torch.equal(batch.input_ids_BL[b, span], ref.input_ids_BL[0, :n])
                assert batch.position_ids_BL[b, span].tolist() == list(range(n))
                # the first token is never a target: the previous row's last position gets none
                assert int(batch.labels_BL[b, start]) == IGNORE_INDEX
                assert torch.equal(batch.labels_BL[b, start + 1:start + n], ref.labels_BL[0, 1:n])
                # target position t (predicting token t + 1) moves with its row
                targets = [f.name for f in dataclasses.fields(batch.targets)]
                for f in targets:
                    mine = getattr(batch.targets, f)[b, start:start + n - 1]
                    theirs = getattr(ref.targets, f)[0, :n - 1]
                    width = min(mine.shape[-1], theirs.shape[-1])  # sampled: M differs per batch
                    assert torch.equal(mine[..., :width], theirs[..., :width])
                assert torch.equal(batch.hidden_mask_BL[b, span], ref.hidden_mask_BL[0, :n])
                assert torch.equal(batch.teacher_hidden[2][b, span], ref.teacher_hidden[2][0, :n])
                start += n
            assert int(batch.attention_mask_BL[b].sum()) == start
            assert int(batch.labels_BL[b, start:].ne(IGNORE_INDEX).sum()) == 0


def test_packed_loss_equals_the_loss_of_rows_alone_float64(cache):
    """The same rows, packed or one per batch row: CE, KL, agreement, hidden cosine and token
    counts add up to the same sums."""
    def sums(**kw):
        model = student("sdpa").train()
        with load(cache, **kw) as ld:
            kl_mode = "sampled" if ld.spec.targets.mode == "sampled" else "tail"
            loss_cfg = LossConfig(ce_weight=0.3, kl_weight=0.7, kl_temperature=2.0, hidden_cosine_weight=0.5,
                                  kl_mode=kl_mode, layer_pairs=((1, 2),), chunk_size=32)
            torch.manual_seed(0)  # the same hidden projection both times
            distill = DistillModel(model, loss_cfg, TargetLayout.from_spec(ld.spec, loss_cfg)).double()
            total = None
            for batch in ld.epoch_batches():
                batch = batch._map(lambda t: t.double() if t.is_floating_point() else t)
                loss, s = distill(batch, num_valid_global=1.0, num_hidden_global=1.0)
                values = torch.stack([loss.detach().double(), *(v.double() for v in (
                    s.ce_sum, s.kl_sum, s.top1_agree_sum, s.valid_tokens, s.hidden_dist_sum, s.hidden_positions))])
                total = values if total is None else total + values
            return total

    alone = sums(micro_batch=1)
    packed = sums(micro_batch=2, pack=True)
    assert alone[4] > 0 and alone[6] > 0
    # the objective itself in float64; the metric sums travel as float32
    torch.testing.assert_close(packed[0], alone[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(packed[1:], alone[1:], rtol=1e-6, atol=0)


def test_packed_loader_resumes_where_it_stopped_and_refuses_other_layouts(cache):
    with load(cache, micro_batch=1, pack=True, seed=5, shuffle=True) as ld:
        it = iter(ld)
        next(it)
        state = ld.state_dict()
        expected = [b.row_ids_BR.tolist() for b in [next(it) for _ in range(3)]]
    with load(cache, micro_batch=1, pack=True, seed=5, shuffle=True) as ld:
        ld.load_state_dict(state)
        it = iter(ld)
        assert [b.row_ids_BR.tolist() for b in [next(it) for _ in range(3)]] == expected
    with load(cache, micro_batch=1, seed=5, shuffle=True) as plain:
        with pytest.raises(ValueError, match="pack"):
            plain.load_state_dict(state)

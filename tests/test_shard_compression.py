"""Shard buffer compression is a writer choice (zstd, lz4, none): every codec
decodes to the same rows, and inspect-shard's byte accounting holds for each."""

import numpy as np
import pytest
import torch

from common.inspect import column_bytes
from common.shard_reader import ShardReader
from common.manifest import shard_file_name
from common.shard_writer import buffer_codec
from common.spec import HiddenSpec, ShardSpec, TargetSpec
from peaked import teacher_row
from synthetic_cache import write_cache_rows

SPEC = ShardSpec(vocab_size=5000, targets=TargetSpec(k=16, temperatures=(1.0, 2.0)),
                 hidden=HiddenSpec(layers=(2,), dtype="fp8", hidden_size=64, token_fraction=0.5, seed=3))


def write(tmp_path, compression: str):
    rows = [teacher_row(SPEC, row_id, length, seed=row_id).row for row_id, length in enumerate((40, 7, 65, 1))]
    cache = write_cache_rows(tmp_path / compression, SPEC, [rows], compression=compression)
    return cache / shard_file_name(0)


def test_every_codec_decodes_to_the_same_rows_and_accounts_its_bytes(tmp_path):
    paths = {c: write(tmp_path, c) for c in ("zstd", "lz4", "none")}
    decoded = {c: list(ShardReader(p).iter_rows(verify_content=True)) for c, p in paths.items()}
    for codec in ("lz4", "none"):
        for a, b in zip(decoded["zstd"], decoded[codec]):
            np.testing.assert_array_equal(a.input_ids_L, b.input_ids_L)
            np.testing.assert_array_equal(a.targets.ids_PK, b.targets.ids_PK)
            np.testing.assert_array_equal(a.targets.logits_PK, b.targets.logits_PK)
            np.testing.assert_array_equal(a.targets.lse_PT, b.targets.lse_PT)
            assert torch.equal(a.hidden[2], b.hidden[2])
    sizes = {c: {col.name: col for col in column_bytes(p)} for c, p in paths.items()}
    for name, col in sizes["none"].items():
        # Uncompressed: stored bytes are the raw bytes, and every codec agrees on the raw size.
        assert col.compressed == col.uncompressed == sizes["zstd"][name].uncompressed == sizes["lz4"][name].uncompressed
    # The delta-coded id planes compress under both codecs.
    assert sizes["zstd"]["topk_ids"].compressed < sizes["none"]["topk_ids"].compressed
    assert sizes["lz4"]["topk_ids"].compressed < sizes["none"]["topk_ids"].compressed
    assert paths["none"].stat().st_size > paths["lz4"].stat().st_size


def test_unknown_compression_is_refused():
    with pytest.raises(ValueError, match="compression must be one of zstd, lz4, none, got 'gzip'"):
        buffer_codec("gzip")

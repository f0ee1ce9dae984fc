"""A byte that changes inside a written shard is caught on every read, naming its
shard, row and column, even when the file still decodes and its sha256 in the
manifest was recomputed; --verify holds each shard to its manifest row range;
format 1 caches (no row checksums) still load, with a warning.

Caches come from the training tests' tiny teacher (tests/train_fixtures.py):
top-16 targets with log-sum-exps at T = 1 and 2, bf16 hidden states of layer 2.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from typer.testing import CliRunner

from cli.main import app
from common.manifest import MANIFEST_NAME, CacheManifest, load_manifest, resolve_inside
from common.shard_format import CHECKSUM_COLUMN, ShardFormatError, checksummed_columns
from common.cache_dir import CacheDir
from common.shard_reader import ShardReader
from common.spec import ShardSpec, TargetSpec
from peaked import flip_cell_byte
from peaked import write_cache as peaked_cache
from student_train.loader import CacheLoader, LoaderConfig
from student_train.trainer import Trainer
from train_fixtures import make_rows, save_tiny_student, tiny_config, tiny_teacher, write_cache

# The cells a silent corruption hurts most: hidden states, log-sum-exps, top-k values.
TAMPERED_COLUMNS = ("hidden_2", "lse", "topk_values")
TAMPERED_ROW = 9  # in the second shard (8 rows per shard)


@pytest.fixture(scope="module")
def sound(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("checksums")
    ns = SimpleNamespace(cache=tmp / "cache", student=save_tiny_student(tmp / "student"))
    write_cache(ns.cache, make_rows(16, 10, 16, seed=0), tiny_teacher(), hidden_layers=(2,))
    return ns


def tampered_copy(sound, tmp_path: Path, column: str) -> tuple[Path, Path]:
    """(cache, shard) with one bit of one cell of TAMPERED_ROW flipped; sha256s resealed."""
    cache = tmp_path / "cache"
    shutil.copytree(sound.cache, cache)
    return cache, flip_cell_byte(cache, TAMPERED_ROW, column)


def mismatch(shard: Path, column: str) -> str:
    return rf"{re.escape(str(shard))}: row {TAMPERED_ROW}: checksum mismatch in column\(s\) {column}\b"


def loader(cache: Path, **kw) -> CacheLoader:
    return CacheLoader(LoaderConfig(cache_dir=str(cache), seq_len=16, shuffle=False, hidden_layers=(2,), **kw))


def invoke(*args) -> object:
    return CliRunner().invoke(app, ["inspect-shard", *map(str, args)])


# ---------------------------------------------------------------- what is stored


def test_each_row_stores_the_crc32_of_every_other_cell(sound):
    """The format's definition, recomputed from the Arrow buffers without the reader."""
    for entry in load_manifest(sound.cache).shards:
        with pa.memory_map(str(resolve_inside(sound.cache, entry.file))) as source:
            table = ipc.open_file(source).read_all()
        spec = ShardSpec.from_dict(json.loads(table.schema.metadata[b"vpmoe.shard_spec"]))
        columns = checksummed_columns(spec)
        assert table.schema.names == [*columns, CHECKSUM_COLUMN]
        assert table.schema.field(CHECKSUM_COLUMN).type == pa.list_(pa.uint32(), len(columns))
        for r, stored in enumerate(table.column(CHECKSUM_COLUMN).to_pylist()):
            expected = []
            for name in columns:
                cell = table.column(name)[r]
                if name == "row_id":
                    data = cell.as_py().to_bytes(8, "little", signed=True)
                elif pa.types.is_list(cell.type):
                    data = np.asarray(cell.as_py(), dtype="<i4").tobytes()
                else:
                    data = cell.as_py()
                expected.append(zlib.crc32(data))
            assert stored == expected, (entry.file, r)


def test_the_tampered_shard_decodes_and_its_resealed_sha256_passes(sound, tmp_path):
    cache, shard = tampered_copy(sound, tmp_path, "lse")
    entry = next(e for e in load_manifest(cache).shards if e.file == shard.name)
    with ShardReader(shard, entry=entry, verify_checksum=True, verify_cells=False) as reader:
        rows = {row.row_id: row for row in reader.iter_rows(verify_content=True)}
    with ShardReader(sound.cache / shard.name, verify_cells=False) as reader:
        before = {row.row_id: row for row in reader.iter_rows()}
    changed = [r for r in rows if not np.array_equal(rows[r].targets.lse_PT, before[r].targets.lse_PT)]
    assert changed == [TAMPERED_ROW]  # the lowest bit of one lse: a change no value check can see


# ---------------------------------------------------------------- a changed byte stops every reader


@pytest.mark.parametrize("column", TAMPERED_COLUMNS)
def test_loader_names_shard_row_and_column(sound, tmp_path, column):
    cache, shard = tampered_copy(sound, tmp_path, column)
    with loader(cache) as ld, pytest.raises(ShardFormatError, match=mismatch(shard, column)):
        list(ld.epoch_batches())
    with loader(cache, verify_checksums=False) as ld:  # unchecked, the corruption trains silently
        assert len(list(ld.epoch_batches())) == 16


def test_a_decode_process_names_shard_row_and_column(sound, tmp_path):
    cache, shard = tampered_copy(sound, tmp_path, "hidden_2")
    with loader(cache, decode_processes=1) as ld, pytest.raises(ShardFormatError, match=mismatch(shard, "hidden_2")):
        list(ld.epoch_batches())


@pytest.mark.parametrize("column", TAMPERED_COLUMNS)
def test_inspect_verify_names_shard_row_and_column(sound, tmp_path, column):
    cache, shard = tampered_copy(sound, tmp_path, column)
    result = invoke(cache, "--verify", "--json")
    assert result.exit_code == 1, result.output
    problems = json.loads(result.stdout)["verify"]["problems"]
    assert len(problems) == 1 and re.match(mismatch(shard, column), problems[0]), problems


@pytest.mark.parametrize("column", TAMPERED_COLUMNS)
def test_plain_inspect_and_row_view_stop_naming_shard_row_and_column(sound, tmp_path, column):
    cache, shard = tampered_copy(sound, tmp_path, column)
    for args in ([], ["--row", TAMPERED_ROW]):
        result = invoke(cache, *args)
        assert result.exit_code == 2, result.output
        assert re.search(mismatch(shard, column), result.stderr), result.stderr


def test_read_cache_rows_names_shard_row_and_column(sound, tmp_path):
    cache, shard = tampered_copy(sound, tmp_path, "topk_values")
    with pytest.raises(ShardFormatError, match=mismatch(shard, "topk_values")):
        CacheDir(cache).read_rows()


def test_training_stops_naming_shard_row_and_column(sound, tmp_path):
    cache, shard = tampered_copy(sound, tmp_path, "lse")
    cfg = tiny_config(tmp_path, sound.student, cache, None, "data.seq_len=16", "data.micro_batch=4",
                      "data.global_batch=4", "data.shuffle=false", "optim.steps=4", "checkpoint.every=0",
                      "student.experts_implementation=eager", "export.enabled=false")
    trainer = Trainer(cfg)
    try:
        with pytest.raises(ShardFormatError, match=mismatch(shard, "lse")):
            trainer.train()
        assert 0 < trainer.step < 4  # trained up to the batch holding the row, not through it
    finally:
        trainer.close()


# ---------------------------------------------------------------- row ranges


def edit_entry(cache: Path, index: int, **change) -> None:
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    manifest["shards"][index].update(change)
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))


ROW_RANGE_EDITS = {
    "row_start": ({"row_start": 9}, r"shard-00001\.arrow: holds 8 rows, its manifest range \[9, 16\) has 7"),
    "shifted": ({"row_start": 9, "row_end": 17},
                r"shard-00001\.arrow: row 8 is the shard's row 0, where its manifest range \[9, 17\) puts row 9"),
    "overlap": ({"row_start": 7}, r"shard-00000\.arrow \[0, 8\) and shard-00001\.arrow \[7, 16\) overlap"),
}


@pytest.mark.parametrize("case", sorted(ROW_RANGE_EDITS))
def test_verify_holds_each_shard_to_its_manifest_row_range(sound, tmp_path, case):
    change, message = ROW_RANGE_EDITS[case]
    cache = tmp_path / "cache"
    shutil.copytree(sound.cache, cache)
    assert invoke(cache, "--verify").exit_code == 0
    edit_entry(cache, 1, **change)
    assert invoke(cache).exit_code == 0  # only --verify reads the row ids against the ranges
    result = invoke(cache, "--verify", "--json")
    assert result.exit_code == 1, result.output
    problems = json.loads(result.stdout)["verify"]["problems"]
    assert any(re.search(message, p) for p in problems), problems


# ---------------------------------------------------------------- format 1


def test_a_format_1_cache_loads_with_a_warning(tmp_path):
    spec = ShardSpec(vocab_size=5_000, targets=TargetSpec(k=8), format_version=1)
    peaked_cache(tmp_path, spec, [[20, 15], [18]])  # as format 1 wrote it: no checksums column
    with ShardReader(tmp_path / "shard-00000.arrow") as reader:
        assert CHECKSUM_COLUMN not in reader.schema.names
        assert len(list(reader.iter_rows(verify_content=True))) == 2
    unchecked = r"format 1 cache: rows carry no checksums"
    config = LoaderConfig(cache_dir=str(tmp_path), seq_len=32, shuffle=False)
    with pytest.warns(UserWarning, match=unchecked) as caught, CacheLoader(config) as ld:
        assert sorted(int(i) for batch in ld.epoch_batches() for i in batch.row_ids_B) == [0, 1, 2]
    assert len(caught) == 1  # one line per cache, not per shard or row
    with pytest.warns(UserWarning, match=unchecked):
        result = invoke(tmp_path, "--verify", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format_version"] == 1 and report["row_checksums"] is False and report["verify"]["ok"]


def test_cache_teacher_does_not_add_format_2_shards_to_a_format_1_cache():
    from common.manifest import header_differences

    spec = ShardSpec(vocab_size=300)
    old = CacheManifest(spec=dataclasses.replace(spec, format_version=1))
    assert header_differences(old, CacheManifest(spec=spec)) == ["format version (1 -> 2)"]

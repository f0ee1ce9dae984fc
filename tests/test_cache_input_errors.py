"""`vpmoe cache-teacher` on bad input: one line on stderr naming the file (and
split and row, or the flag), exit code 2, nothing written, never a traceback;
an empty selection is cached with a warning; a dataset with more columns than
`input_ids` and `labels` is cached from those two."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cli.main import app
from common.manifest import MANIFEST_NAME, load_manifest
from common.cache_dir import CacheDir
from demo.tiny_models import build_model, save_model, tiny_llama_config

VOCAB = 384


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "model"
    save_model(build_model(tiny_llama_config(VOCAB), seed=3), path)
    return path


def token_rows(seed: int, count: int = 5) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, int(n)).tolist() for n in rng.integers(6, 30, count)]


def masked(rows: list[list[int]]) -> list[list[int]]:
    return [[-100] * 3 + r[3:] for r in rows]


def save_dataset(path: Path, columns: dict) -> Path:
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return path


def cache_teacher(model_dir: Path, data: Path, out: Path, *args: str):
    return CliRunner().invoke(app, ["cache-teacher", "--model", str(model_dir), "--data", str(data),
                                    "--out", str(out), "--top-k", "8", "--no-progress", *args])


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def good_data(tmp_path) -> Path:
    rows = token_rows(0)
    return save_dataset(tmp_path / "good", {"input_ids": rows, "labels": masked(rows)})


# ---- --out ---------------------------------------------------------------------------

def test_out_that_is_a_file_or_inside_a_file(model_dir, good_data, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert_one_line_error(cache_teacher(model_dir, good_data, a_file), f"--out {a_file}", "not a directory")
    assert_one_line_error(cache_teacher(model_dir, good_data, a_file / "cache"), str(a_file), "is a file")
    assert a_file.read_text() == "not a directory"


def test_out_that_is_not_writable(model_dir, good_data, tmp_path, monkeypatch):
    # chmod cannot stop root, so the permission check is told what the file system would say.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert_one_line_error(cache_teacher(model_dir, good_data, locked / "cache", "--dry-run"),
                          f"--out {locked / 'cache'}", f"{locked} is not writable")
    assert not (locked / "cache").exists()


# ---- data files ------------------------------------------------------------------------

def test_data_file_that_is_not_arrow(model_dir, tmp_path):
    garbage = tmp_path / "rows.arrow"
    garbage.write_bytes(os.urandom(4096))
    assert_one_line_error(cache_teacher(model_dir, garbage, tmp_path / "out"), str(garbage),
                          "not an Arrow IPC file or stream")
    table = pa.table({"input_ids": pa.array(token_rows(1, 64), type=pa.list_(pa.int32()))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=8)
    truncated = tmp_path / "truncated.arrow"
    stream = sink.getvalue().to_pybytes()
    truncated.write_bytes(stream[:len(stream) // 2])
    assert_one_line_error(cache_teacher(model_dir, truncated, tmp_path / "out"), str(truncated),
                          "not an Arrow IPC file or stream")
    assert not (tmp_path / "out").exists()


def test_saved_dataset_whose_data_file_is_not_arrow(model_dir, good_data, tmp_path):
    data_file = next(good_data.glob("*.arrow"))
    data_file.write_bytes(b"\x00\x01" * 1000)
    assert_one_line_error(cache_teacher(model_dir, good_data, tmp_path / "out"), str(data_file))


@pytest.mark.parametrize("name", ["../elsewhere.arrow", "ABSOLUTE", "linked/data.arrow"])
def test_state_json_naming_a_data_file_outside_the_dataset_is_refused(model_dir, good_data, tmp_path, name):
    outside = tmp_path / "elsewhere.arrow"
    shutil.copy(next(good_data.glob("*.arrow")), outside)
    (good_data / "linked").symlink_to(tmp_path, target_is_directory=True)
    name = str(outside) if name == "ABSOLUTE" else name
    state = json.loads((good_data / "state.json").read_text())
    state["_data_files"] = [{"filename": name}]
    (good_data / "state.json").write_text(json.dumps(state))
    assert_one_line_error(cache_teacher(model_dir, good_data, tmp_path / "out"), str(good_data / "state.json"),
                          repr(name), "outside the dataset directory")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file, text, message", [
    ("state.json", "[1, 2]", "expects a JSON object, got list"),
    ("state.json", "{broken", "not readable JSON"),
    ("state.json", '{"_data_files": "data.arrow"}', "key '_data_files' must list"),
    ("state.json", '{"_data_files": [{"filename": 7}]}', "key '_data_files' must list"),
    ("dataset_dict.json", '{"splits": "train"}', "key 'splits' must be a list"),
    ("dataset_dict.json", "[]", "expects a JSON object"),
])
def test_saved_dataset_metadata_of_the_wrong_shape(model_dir, tmp_path, file, text, message):
    rows = token_rows(2)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": rows})}).save_to_disk(
        str(tmp_path / "dict"))
    path = tmp_path / "dict" / file if file == "dataset_dict.json" else tmp_path / "dict" / "train" / file
    path.write_text(text)
    assert_one_line_error(cache_teacher(model_dir, tmp_path / "dict", tmp_path / "out"), str(path), message)


# ---- row values ----------------------------------------------------------------------

@pytest.mark.parametrize("column, row, position, value, message", [
    ("labels", 2, 5, VOCAB, f"label {VOCAB} at position 5 is neither -100 nor in the teacher vocabulary"),
    ("labels", 3, 4, -1, "label -1 at position 4 is neither -100 nor in the teacher vocabulary"),
    ("labels", 1, 3, -101, "label -101 at position 3"),
    ("input_ids", 4, 2, VOCAB + 7, f"token id {VOCAB + 7} at position 2 is outside the teacher vocabulary"),
    ("input_ids", 0, 0, -100, "token id -100 at position 0"),
])
def test_out_of_range_labels_and_ids_name_the_split_and_row(model_dir, tmp_path, column, row, position, value,
                                                            message):
    rows = token_rows(3)
    columns = {"input_ids": rows, "labels": masked(rows)}
    columns[column][row][position] = value
    data = save_dataset(tmp_path / "bad", columns)
    assert_one_line_error(cache_teacher(model_dir, data, tmp_path / "out"), f"split 'train', row {row}", message)
    assert not (tmp_path / "out").exists()


# ---- flags ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["--top-k", "-3"], "--top-k must be >= 1, got -3"),
    (["--temperatures", "nan"], "--temperatures must be finite and > 0, got nan"),
    (["--temperatures", "1,inf"], "--temperatures must be finite and > 0, got inf"),
    (["--temperatures", "0"], "--temperatures must be finite and > 0, got 0.0"),
    (["--temperatures", "2,-1"], "--temperatures must be finite and > 0, got -1.0"),
    (["--temperatures", "2,2"], "--temperatures lists a temperature twice"),
    (["--max-tokens-per-batch", "0"], "--max-tokens-per-batch must be >= 1"),
])
def test_flags_no_run_can_use_are_refused_before_anything_is_read(model_dir, tmp_path, args, message):
    result = CliRunner().invoke(app, ["cache-teacher", "--model", str(model_dir), "--data",
                                      str(tmp_path / "not_read"), "--out", str(tmp_path / "out"), *args])
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


# ---- empty selections ------------------------------------------------------------------

def test_an_empty_selection_is_cached_with_a_warning(model_dir, good_data, tmp_path):
    result = cache_teacher(model_dir, good_data, tmp_path / "limited", "--limit-rows", "0")
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output and "--limit-rows 0 selects none of its rows" in result.output
    assert load_manifest(tmp_path / "limited").shards == []

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    datasets.Dataset.from_dict({"input_ids": []}, features=features).save_to_disk(str(tmp_path / "empty"))
    result = cache_teacher(model_dir, tmp_path / "empty", tmp_path / "zero")
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output and "split 'train' has no rows" in result.output
    assert (tmp_path / "zero" / MANIFEST_NAME).is_file() and load_manifest(tmp_path / "zero").shards == []


# ---- a dataset with more than input_ids and labels (issue #20) ---------------------------

def issue20_dataset(path: Path, rows: list[list[int]]) -> Path:
    """The phase-1 mix's layout: string ids and struct columns beside the tokens."""
    n = len(rows)
    return save_dataset(path, {
        "id": [f"mix-{i:06d}" for i in range(n)],
        "input_ids": rows,
        "labels": masked(rows),
        "source": [{"dataset": "stdlib", "language": "python", "exercise": f"ex{i}", "meta_json": "{}"}
                   for i in range(n)],
        "spans": [{"assistant_token_start": 3, "analysis_token_count": len(r) - 4, "final_token_count": 1}
                  for r in rows],
    })


def test_extra_struct_and_string_columns_are_ignored(model_dir, tmp_path):
    rows = token_rows(4)
    data = issue20_dataset(tmp_path / "mix", rows)
    result = cache_teacher(model_dir, data, tmp_path / "out")
    assert result.exit_code == 0, result.output
    stored = CacheDir(tmp_path / "out").read_rows()
    assert sorted(stored) == list(range(len(rows)))
    for row_id, ids in enumerate(rows):
        np.testing.assert_array_equal(stored[row_id].input_ids_L, ids)
        np.testing.assert_array_equal(stored[row_id].labels_L, masked(rows)[row_id])

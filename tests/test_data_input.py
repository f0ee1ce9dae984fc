"""Teacher input: save_to_disk (DatasetDict and Dataset), Parquet and Arrow files,
hub file layouts, row validation errors, content fingerprints, and
`vpmoe download-data` (hub monkeypatched, and offline)."""

from __future__ import annotations

import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from teacher_cache.data import open_source

VOCAB = 300


def _rows(seed: int, count: int, low: int = 3, high: int = 30) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, int(n)).tolist() for n in rng.integers(low, high, count)]


def _labels(rows: list[list[int]]) -> list[list[int]]:
    return [[-100] * (len(r) // 2) + r[len(r) // 2:] for r in rows]


def _table(rows, labels=None) -> pa.Table:
    columns = {"input_ids": pa.array(rows, type=pa.list_(pa.int32()))}
    if labels is not None:
        columns["labels"] = pa.array(labels, type=pa.list_(pa.int64()))
    return pa.table(columns)


def _assert_rows(source, rows, labels=None):
    assert source.num_rows == len(rows)
    for i, expected in enumerate(rows):
        row = source.row(i)
        assert row.row_id == i and row.input_ids.dtype == np.int32 and row.labels.dtype == np.int32
        np.testing.assert_array_equal(row.input_ids, expected)
        # Without a labels column every token is a target.
        np.testing.assert_array_equal(row.labels, labels[i] if labels is not None else expected)


@pytest.fixture
def saved_dict(tmp_path):
    train, val = _rows(0, 7), _rows(1, 4)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"id": [str(i) for i in range(7)], "input_ids": train,
                                             "labels": _labels(train), "attention_mask": [[1] * len(r) for r in train]}),
        "validation": datasets.Dataset.from_dict({"input_ids": val, "labels": _labels(val)}),
    }).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved", train, val


def test_save_to_disk_dataset_dict_splits_and_unknown_split(saved_dict):
    path, train, val = saved_dict
    _assert_rows(open_source(path, "train"), train, _labels(train))
    _assert_rows(open_source(path, "validation"), val, _labels(val))
    limited = open_source(path, "train", limit_rows=3)
    assert limited.num_rows == 3 and limited.total_rows == 7 and limited.num_tokens == sum(map(len, train[:3]))
    with pytest.raises(ValueError, match=r"saved: unknown split 'test' \(splits: train, validation\)"):
        open_source(path, "test")


def test_save_to_disk_dataset_parquet_and_arrow_files(tmp_path):
    rows = _rows(2, 9)
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "single"))
    _assert_rows(open_source(tmp_path / "single", "train"), rows)
    pq.write_table(_table(rows, _labels(rows)), tmp_path / "rows.parquet")
    _assert_rows(open_source(tmp_path / "rows.parquet", "train"), rows, _labels(rows))
    # Arrow IPC file and stream, several record batches each (rows span chunks).
    table = _table(rows)
    for name, opener in (("rows.arrow", ipc.new_file), ("stream.arrow", ipc.new_stream)):
        with pa.OSFile(str(tmp_path / name), "wb") as sink, opener(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=2):
                writer.write_batch(batch)
        _assert_rows(open_source(tmp_path / name, "train"), rows)


def test_hub_layout_directory_concatenates_files_of_the_split_in_order(tmp_path):
    a, b, val = _rows(3, 5), _rows(4, 6), _rows(5, 2)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pq.write_table(_table(a), tmp_path / "repo/data/train-00000-of-00002.parquet")
    pq.write_table(_table(b), tmp_path / "repo/data/train-00001-of-00002.parquet")
    pq.write_table(_table(val), tmp_path / "repo/data/validation-00000-of-00001.parquet")
    source = open_source(tmp_path / "repo", "train")
    _assert_rows(source, a + b)
    assert source.where(6) == f"{tmp_path}/repo/data/train-00001-of-00002.parquet: split 'train', row 6"
    _assert_rows(open_source(tmp_path / "repo", "validation"), val)
    with pytest.raises(ValueError, match=r"unknown split 'test' \(splits: train, validation\)"):
        open_source(tmp_path / "repo", "test")


def test_bad_rows_are_named_by_file_split_row_and_position(tmp_path):
    rows = _rows(6, 6, low=5)
    too_big = [list(r) for r in rows]
    too_big[4][3] = VOCAB
    pq.write_table(_table(too_big), tmp_path / "big.parquet")
    with pytest.raises(ValueError, match=r"big.parquet: split 'train', row 4: token id 300 at position 3 is outside "
                                         r"the teacher vocabulary \[0, 300\)"):
        open_source(tmp_path / "big.parquet", "train").validate(VOCAB, 1024)
    # A bad row past --limit-rows is never used, so it is not an error.
    open_source(tmp_path / "big.parquet", "train", limit_rows=4).validate(VOCAB, 1024)

    negative = [list(r) for r in rows]
    negative[1][0] = -1
    pq.write_table(_table(negative), tmp_path / "neg.parquet")
    with pytest.raises(ValueError, match="row 1: token id -1 at position 0"):
        open_source(tmp_path / "neg.parquet", "train").validate(VOCAB, 1024)

    pq.write_table(_table(rows[:2] + [list(range(40))]), tmp_path / "long.parquet")
    with pytest.raises(ValueError, match=r"long.parquet: split 'train', row 2 is longer than the model context "
                                         r"\(32\) \(40 tokens\)"):
        open_source(tmp_path / "long.parquet", "train").validate(VOCAB, 32)

    pq.write_table(_table(rows[:1] + [[]]), tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="row 1 is empty"):
        open_source(tmp_path / "empty.parquet", "train").validate(VOCAB, 1024)

    labels = _labels(rows)
    labels[3] = labels[3][:-1]
    pq.write_table(_table(rows, labels), tmp_path / "labels.parquet")
    with pytest.raises(ValueError, match="row 3: labels has .* tokens, input_ids"):
        open_source(tmp_path / "labels.parquet", "train").validate(VOCAB, 1024)

    pq.write_table(pa.table({"input_ids": pa.array([rows[0], None], type=pa.list_(pa.int32()))}),
                   tmp_path / "null.parquet")
    with pytest.raises(ValueError, match="null.parquet: column 'input_ids' is null in row 1"):
        open_source(tmp_path / "null.parquet", "train")

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "text.parquet")
    with pytest.raises(ValueError, match=r"text.parquet: split 'train' has no 'input_ids' column \(columns: text\)"):
        open_source(tmp_path / "text.parquet", "train")
    with pytest.raises(ValueError, match="nowhere does not exist"):
        open_source(tmp_path / "nowhere", "train")


def test_fingerprint_follows_content_not_path_format_or_limit(tmp_path):
    rows = _rows(7, 8)
    pq.write_table(_table(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "b"))
    fp = open_source(tmp_path / "a.parquet", "train").fingerprint()
    assert open_source(tmp_path / "b", "train").fingerprint() == fp
    assert open_source(tmp_path / "a.parquet", "train", limit_rows=2).fingerprint() == fp
    changed = [list(r) for r in rows]
    changed[5][0] = (changed[5][0] + 1) % VOCAB
    pq.write_table(_table(changed), tmp_path / "c.parquet")
    assert open_source(tmp_path / "c.parquet", "train").fingerprint() != fp
    pq.write_table(_table(rows, _labels(rows)), tmp_path / "d.parquet")
    assert open_source(tmp_path / "d.parquet", "train").fingerprint() != fp, "labels are part of the content"


def test_download_data_fetches_a_snapshot_that_cache_teacher_can_read(saved_dict, tmp_path, monkeypatch):
    import huggingface_hub

    from cli.main import app

    path, train, val = saved_dict
    calls = []

    def fake_snapshot_download(repo_id, *, repo_type=None, revision=None, local_dir=None, **kw):
        calls.append((repo_id, repo_type, revision))
        shutil.copytree(path, local_dir, dirs_exist_ok=True)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = tmp_path / "download"
    result = CliRunner().invoke(app, ["download-data", "someone/tokenized-mix", "--out", str(out),
                                      "--revision", "v1"])
    assert result.exit_code == 0, result.output
    assert calls == [("someone/tokenized-mix", "dataset", "v1")]
    assert "splits train, validation" in result.output
    _assert_rows(open_source(out, "validation"), val, _labels(val))


def test_download_data_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from cli.main import app

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    result = CliRunner().invoke(app, ["download-data", "someone/tokenized-mix", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "cannot reach the Hugging Face Hub to download dataset someone/tokenized-mix (offline?)" in result.output
    assert "--data" in result.output
    assert not list((tmp_path / "d").glob("*.arrow"))

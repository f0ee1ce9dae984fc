"""A manifest or sidecar that is valid JSON of the wrong shape is refused where it
is read, in one line naming the file and the key: by `load_manifest`, by
`inspect-shard` (exit 2), by a `cache-teacher` resume and by `vpmoe train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from common.manifest import MANIFEST_NAME, load_manifest, read_sidecar, shard_file_name
from common.shard_format import ShardFormatError
from common.spec import ShardSpec, TargetSpec
from peaked import write_cache

V = 300

# name: (change to the manifest's JSON, key named in the error)
WRONG_SHAPES = {
    "string for an int": (lambda m: m["shards"][0].update(rows="2"), "'rows' expects an integer"),
    "bool for an int": (lambda m: m["shards"][0].update(bytes=True), "'bytes' expects an integer"),
    "missing shard key": (lambda m: m["shards"][0].pop("sha256"), "missing key 'sha256'"),
    "dict for the shard list": (lambda m: m.update(shards={"0": m["shards"][0]}), "'shards' expects a list"),
    "string for a shard entry": (lambda m: m["shards"].__setitem__(0, "shard-00000.arrow"),
                                 "'shards[0]' expects an object"),
    "string for top-k": (lambda m: m["spec"]["targets"].update(k="8"), "'spec.targets.k' expects an integer"),
    "string for temperatures": (lambda m: m["spec"]["targets"].update(temperatures="1,2"),
                                "'spec.targets.temperatures' expects a list"),
    "NaN temperature": (lambda m: m["spec"]["targets"].update(temperatures=[float("nan")]),
                        "'spec.targets.temperatures[0]' expects a finite number"),
    "list for the targets": (lambda m: m["spec"].update(targets=[]), "'spec.targets' expects an object"),
    "missing spec key": (lambda m: m["spec"]["targets"].pop("k"), "missing key 'spec.targets.k'"),
    "list for the teacher": (lambda m: m.update(teacher=["gpt-oss"]), "'teacher' expects an object"),
    "string for rows per shard": (lambda m: m["work"].update(rows_per_shard="8"),
                                  "'work.rows_per_shard' expects an integer"),
}


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    write_cache(tmp_path / "cache", ShardSpec(vocab_size=V, targets=TargetSpec(k=8)), [[20, 15], [18]])
    return tmp_path / "cache"


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize("case", sorted(WRONG_SHAPES))
def test_wrong_json_types_name_the_manifest_and_the_key(cache_dir, case):
    change, message = WRONG_SHAPES[case]
    edit_json(cache_dir / MANIFEST_NAME, change)
    with pytest.raises(ShardFormatError) as err:
        load_manifest(cache_dir)
    text = str(err.value)
    assert text.startswith(str(cache_dir / MANIFEST_NAME)) and message in text and "\n" not in text, text


def test_a_manifest_that_is_not_an_object_is_refused(cache_dir):
    (cache_dir / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ShardFormatError, match=r"manifest.json: expects a JSON object, got list"):
        load_manifest(cache_dir)


def test_a_sidecar_of_the_wrong_shape_names_its_file_and_key(cache_dir):
    sidecar = cache_dir / (shard_file_name(0) + ".json")
    edit_json(sidecar, lambda e: e.update(row_end="2"))
    with pytest.raises(ShardFormatError, match=rf"{sidecar}: shard entry: key 'row_end' expects an integer"):
        read_sidecar(sidecar)
    sidecar.write_text('"shard-00000.arrow"')
    with pytest.raises(ShardFormatError, match=rf"{sidecar}: shard entry: the top level expects an object"):
        read_sidecar(sidecar)


def test_keys_a_later_writer_adds_to_a_shard_entry_are_ignored(cache_dir):
    edit_json(cache_dir / MANIFEST_NAME, lambda m: m["shards"][0].update(written_by="node-3"))
    assert load_manifest(cache_dir).shards[0].rows == 2


@pytest.mark.parametrize("case", ["string for an int", "dict for the shard list", "string for top-k"])
def test_inspect_shard_exits_2_with_one_line(cache_dir, case):
    change, message = WRONG_SHAPES[case]
    edit_json(cache_dir / MANIFEST_NAME, change)
    result = CliRunner().invoke(app, ["inspect-shard", str(cache_dir)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and MANIFEST_NAME in lines[0], result.stderr
    assert message in lines[0]


def test_cache_teacher_resume_over_a_malformed_manifest_exits_2(tmp_path, cache_dir):
    """The existing cache in --out is read before any model work."""
    from demo.tiny_models import build_model, save_model, tiny_llama_config
    import pyarrow as pa
    import pyarrow.parquet as pq

    save_model(build_model(tiny_llama_config(V), seed=1), tmp_path / "model")
    pq.write_table(pa.table({"input_ids": pa.array([[1, 2, 3, 4]], type=pa.list_(pa.int32()))}),
                   tmp_path / "rows.parquet")
    edit_json(cache_dir / MANIFEST_NAME, WRONG_SHAPES["string for rows per shard"][0])
    result = CliRunner().invoke(app, ["cache-teacher", "--model", str(tmp_path / "model"), "--data",
                                      str(tmp_path / "rows.parquet"), "--out", str(cache_dir), "--top-k", "8",
                                      "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.json: key 'work.rows_per_shard' expects an integer" in lines[0], lines

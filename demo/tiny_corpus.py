"""A real-text corpus every machine has: the Python standard library's sources.

Used by the CPU quickstart and the proof benchmark. Files are split into
train and validation by a hash of their path (never a file in both), a
byte-level BPE tokenizer is trained on the train split, and the tokens are
cut into fixed-length rows saved in the HF `save_to_disk` layout the
production data uses (`input_ids`, `labels`, `attention_mask`).
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np

from common.causal_lm import IGNORE_INDEX

# The first tokens of every row are masked in `labels`, like the system/user
# turns of the production data, so the label mask is exercised end to end.
PROMPT_FRACTION = 0.25


def python_source_files(root: Path | None = None, max_files: int | None = None) -> list[Path]:
    """Python files under `root` (default: the standard library), tests and
    (for the standard library) installed packages left out, in a fixed order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py")
                   if not skip.intersection(p.relative_to(root).parts) and p.is_file())
    return files[:max_files] if max_files else files


def is_validation_file(path: Path, root: Path, fraction: float) -> bool:
    digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < fraction


def read_split_texts(max_bytes: int, validation_fraction: float = 0.1, root: Path | None = None,
                     ) -> tuple[list[str], list[str]]:
    """(train texts, validation texts) from at most `max_bytes` of source."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, validation, used = [], [], 0
    for path in python_source_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (validation if is_validation_file(path, root, validation_fraction) else train).append(text)
        used += len(text)
        if used >= max_bytes:
            break
    if not train or not validation:
        raise ValueError(f"{root}: too little Python source for a train/validation split ({used} bytes)")
    return train, validation


def tokenize_rows(texts: list[str], tokenizer, seq_len: int, max_rows: int | None = None) -> dict[str, list]:
    """Concatenate token streams (eos between files) and cut rows of `seq_len`."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    # Batched calls let the fast tokenizer encode files in parallel.
    for start in range(0, len(texts), 256):
        for ids in tokenizer(texts[start:start + 256]).input_ids:
            stream.extend(ids)
            stream.append(eos)
        if max_rows and len(stream) >= seq_len * max_rows:
            break
    num_rows = len(stream) // seq_len
    if max_rows:
        num_rows = min(num_rows, max_rows)
    ids = np.asarray(stream[: num_rows * seq_len], dtype=np.int32).reshape(num_rows, seq_len)
    labels = ids.copy()
    labels[:, : int(seq_len * PROMPT_FRACTION)] = IGNORE_INDEX
    return {
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "attention_mask": np.ones_like(ids).tolist(),
    }


def build_dataset(out_dir: Path, tokenizer, train_texts: list[str], validation_texts: list[str],
                  seq_len: int, max_train_rows: int | None = None, max_validation_rows: int | None = None):
    """Tokenise both splits and `save_to_disk` them as a DatasetDict."""
    from datasets import Dataset, DatasetDict

    splits = DatasetDict({
        "train": Dataset.from_dict(tokenize_rows(train_texts, tokenizer, seq_len, max_train_rows)),
        "validation": Dataset.from_dict(tokenize_rows(validation_texts, tokenizer, seq_len, max_validation_rows)),
    })
    splits.save_to_disk(str(out_dir))
    return splits

"""A real-text corpus every machine has: the Python standard library's sources.

Used by the CPU quickstart and the proof benchmark. Files are split into
train and validation by a hash of their path (never a file in both), a
byte-level BPE tokenizer is trained on the train split, and the tokens are
cut into fixed-length rows saved in the HF `save_to_disk` layout the
production data uses (`input_ids`, `labels`, `attention_mask`), with the
phase-1 dataset's row columns: `id`, `source` (a struct whose `dataset` is the
standard-library package the row's first token comes from) and `spans` (the
masked prompt, then a synthetic analysis/final split of the rest).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.causal_lm import IGNORE_INDEX

# The first tokens of every row are masked in `labels`, like the system/user
# turns of the production data, so the label mask is exercised end to end.
PROMPT_FRACTION = 0.25
# Of the rest, the analysis channel takes this fraction (seeded per row), the final channel the remainder.
ANALYSIS_FRACTION = (0.3, 0.7)
TOP_LEVEL_SOURCE = "modules"  # files directly in the library root, outside any package


@dataclass(frozen=True)
class SourceText:
    source: str  # the package (first directory under the root), or TOP_LEVEL_SOURCE
    text: str


def source_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else TOP_LEVEL_SOURCE


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


def read_split_sources(max_bytes: int, validation_fraction: float = 0.1, root: Path | None = None,
                       ) -> tuple[list[SourceText], list[SourceText]]:
    """(train files, validation files) with their packages, from at most `max_bytes` of source."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, validation, used = [], [], 0
    for path in python_source_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        split = validation if is_validation_file(path, root, validation_fraction) else train
        split.append(SourceText(source_of(path, root), text))
        used += len(text)
        if used >= max_bytes:
            break
    if not train or not validation:
        raise ValueError(f"{root}: too little Python source for a train/validation split ({used} bytes)")
    return train, validation


def interleave_by_source(texts: list[SourceText]) -> list[SourceText]:
    """Files taken in turn from each package (first-seen order): a split cut short after a few
    rows then still holds several sources, as the phase-1 mix's evals do."""
    by_source: dict[str, list[SourceText]] = {}
    for text in texts:
        by_source.setdefault(text.source, []).append(text)
    queues = list(by_source.values())
    return [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]


def read_split_texts(max_bytes: int, validation_fraction: float = 0.1, root: Path | None = None,
                     ) -> tuple[list[str], list[str]]:
    """(train texts, validation texts) from at most `max_bytes` of source."""
    train, validation = read_split_sources(max_bytes, validation_fraction, root)
    return [t.text for t in train], [t.text for t in validation]


def tokenize_rows(texts: list[str] | list[SourceText], tokenizer, seq_len: int, max_rows: int | None = None,
                  split: str = "train") -> dict[str, list]:
    """Concatenate token streams (eos between files) and cut rows of `seq_len`. Given
    `SourceText`s, rows also get `id`, `source` (the package of each row's first token) and
    `spans` (prompt = the masked first tokens, then a seeded analysis/final split)."""
    eos = tokenizer.eos_token_id
    with_sources = bool(texts) and isinstance(texts[0], SourceText)
    plain = [t.text for t in texts] if with_sources else texts
    stream: list[int] = []
    file_starts: list[int] = []  # where each file's tokens begin in the stream
    # Batched calls let the fast tokenizer encode files in parallel.
    for start in range(0, len(plain), 256):
        for ids in tokenizer(plain[start:start + 256]).input_ids:
            file_starts.append(len(stream))
            stream.extend(ids)
            stream.append(eos)
        if max_rows and len(stream) >= seq_len * max_rows:
            break
    num_rows = len(stream) // seq_len
    if max_rows:
        num_rows = min(num_rows, max_rows)
    ids = np.asarray(stream[: num_rows * seq_len], dtype=np.int32).reshape(num_rows, seq_len)
    labels = ids.copy()
    prompt = int(seq_len * PROMPT_FRACTION)
    labels[:, :prompt] = IGNORE_INDEX
    rows = {
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "attention_mask": np.ones_like(ids).tolist(),
    }
    if with_sources:
        first_file_R = np.searchsorted(np.asarray(file_starts), np.arange(num_rows) * seq_len, side="right") - 1
        sources = [texts[f].source for f in first_file_R]
        rows["id"] = [f"{split}-{r:06d}-{source}" for r, source in enumerate(sources)]
        rows["source"] = [{"dataset": source, "language": "python"} for source in sources]
        rows["spans"] = synthetic_spans(num_rows, seq_len, prompt, seed=0 if split == "train" else 1)
    return rows


def synthetic_spans(num_rows: int, seq_len: int, prompt: int, seed: int) -> list[dict]:
    """The phase-1 `spans` of rows whose first `prompt` tokens are the prompt: the rest split
    into an analysis part (a seeded fraction in ANALYSIS_FRACTION) and a final part."""
    assistant = seq_len - prompt
    fractions = np.random.default_rng(seed).uniform(*ANALYSIS_FRACTION, num_rows)
    analysis = np.rint(fractions * assistant).astype(int)
    return [{"assistant_token_start": prompt, "analysis_token_count": int(a), "final_token_count": assistant - int(a)}
            for a in analysis]


def build_dataset(out_dir: Path, tokenizer, train_texts: list[str] | list[SourceText],
                  validation_texts: list[str] | list[SourceText], seq_len: int, max_train_rows: int | None = None,
                  max_validation_rows: int | None = None):
    """Tokenise both splits and `save_to_disk` them as a DatasetDict (with `id`, `source` and
    `spans` when given `SourceText`s)."""
    from datasets import Dataset, DatasetDict

    splits = DatasetDict({
        "train": Dataset.from_dict(tokenize_rows(train_texts, tokenizer, seq_len, max_train_rows, "train")),
        "validation": Dataset.from_dict(tokenize_rows(validation_texts, tokenizer, seq_len, max_validation_rows,
                                                      "validation")),
    })
    splits.save_to_disk(str(out_dir))
    return splits

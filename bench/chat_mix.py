"""A tokenized chat mix in the phase-1 data's schema, built offline from real text.

The phase-1 dataset (`vpmoe download-data`) is a `save_to_disk` DatasetDict
with `train` and `validation` splits of rows

    id              string
    source          struct {dataset, language, exercise, meta_json: string}
    input_ids       list<int32>
    labels          list<int32>   -100 before the assistant turn
    attention_mask  list<int32>   all ones
    spans           struct {assistant_token_start, analysis_token_count,
                            final_token_count: int32}

This module writes rows of that schema: four named sources mixed in about the
phase-1 proportions, lengths spread log-uniformly between `min_len` and
`max_len` (a chat mix, not all rows full), and tokens taken from real text,
the Python standard library's sources (demo.tiny_corpus; files split
between train and validation by path). No tokenizer is trained: every two
UTF-8 bytes become one id, `TEXT_ID_BASE + (b0 * 256 + b1) % (vocab - TEXT_ID_BASE)`,
so the same text fits a 1,024-id CPU teacher and GPT-OSS's 201,088 ids (where
it uses 65,536 of them). A row reads

    <user> prompt ... <analysis> analysis ... <final> final ...

with the three markers on ids 0, 1 and 2; `assistant_token_start` is the
position of the first assistant marker, the first position with a label.
All four sources hold the same kind of text; they differ in their share of
rows and in how a row splits into prompt, analysis and final answer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.causal_lm import IGNORE_INDEX

USER, ANALYSIS, FINAL = 0, 1, 2  # turn markers
TEXT_ID_BASE = 8  # ids below this are kept for markers
BYTES_PER_TOKEN = 2


@dataclass(frozen=True)
class SourceProfile:
    dataset: str
    share: float  # of the rows
    language: str
    exercise: str
    prompt_fraction: tuple[float, float]  # of the row, before the assistant turn (uniform in this range)
    analysis_fraction: tuple[float, float]  # of the assistant turn; (0, 0): no analysis part


SOURCES = (
    SourceProfile("SYNTH", 0.82, "en", "reasoning", (0.05, 0.30), (0.40, 0.80)),
    SourceProfile("OpenCodeInstruct", 0.08, "python", "code", (0.10, 0.40), (0.20, 0.50)),
    SourceProfile("Nemotron-Math-v2", 0.08, "en", "math", (0.05, 0.20), (0.60, 0.90)),
    SourceProfile("oasst2", 0.02, "multilingual", "chat", (0.20, 0.60), (0.0, 0.0)),
)


@dataclass(frozen=True)
class MixShape:
    rows_train: int
    rows_validation: int
    min_len: int
    max_len: int
    vocab_size: int
    seed: int = 0


def rows_per_source(num_rows: int) -> list[int]:
    """Row counts in proportion to the shares (largest remainder), at least one row per source."""
    exact = [p.share * num_rows for p in SOURCES]
    counts = [max(1, math.floor(x)) for x in exact]
    by_remainder = sorted(range(len(SOURCES)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[:max(0, num_rows - sum(counts))]:
        counts[i] += 1
    while sum(counts) > num_rows:  # fewer rows than sources need: the largest gives way
        counts[counts.index(max(counts))] -= 1
    return counts


def log_uniform_lengths(rng: np.random.Generator, n: int, min_len: int, max_len: int) -> np.ndarray:
    return np.exp(rng.uniform(math.log(min_len), math.log(max_len), n)).round().astype(np.int64).clip(min_len, max_len)


class ByteTokens:
    """A split's text as one byte stream, read in order (wrapping at its end) as token ids."""

    def __init__(self, texts: list[str], vocab_size: int):
        self.data = np.frombuffer("\n".join(texts).encode("utf-8"), dtype=np.uint8)
        self.vocab_size = vocab_size
        self.offset = 0
        self.wraps = 0

    def take(self, num_tokens: int) -> np.ndarray:
        need = num_tokens * BYTES_PER_TOKEN
        if self.offset + need > len(self.data):
            self.offset, self.wraps = 0, self.wraps + 1
        pairs_T2 = self.data[self.offset:self.offset + need].astype(np.int64).reshape(num_tokens, BYTES_PER_TOKEN)
        self.offset += need
        text_ids = self.vocab_size - TEXT_ID_BASE
        return (TEXT_ID_BASE + (pairs_T2[:, 0] * 256 + pairs_T2[:, 1]) % text_ids).astype(np.int32)


def chat_row(text: ByteTokens, length: int, profile: SourceProfile, rng: np.random.Generator) -> dict:
    """One row of `length` tokens: user turn, then (optional) analysis and final answer."""
    prompt = int(np.clip(round(length * rng.uniform(*profile.prompt_fraction)), 2, length - 2))
    assistant = length - prompt
    analysis = round(assistant * rng.uniform(*profile.analysis_fraction))
    analysis = 0 if analysis < 2 else min(analysis, assistant - 2)
    final = assistant - analysis
    parts = [(USER, prompt), (ANALYSIS, analysis), (FINAL, final)]
    ids = np.concatenate([np.concatenate([[marker], text.take(n - 1)]) for marker, n in parts if n]).astype(np.int32)
    labels = ids.copy()
    labels[:prompt] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids),
            "spans": {"assistant_token_start": prompt, "analysis_token_count": analysis, "final_token_count": final}}


def build_split(split: str, num_rows: int, text: ByteTokens, shape: MixShape, split_seed: int) -> dict[str, list]:
    rng = np.random.default_rng([shape.seed, split_seed])
    profiles = [p for p, count in zip(SOURCES, rows_per_source(num_rows)) for _ in range(count)]
    order = rng.permutation(num_rows)
    lengths = log_uniform_lengths(rng, num_rows, shape.min_len, shape.max_len)
    columns: dict[str, list] = {"id": [], "source": [], "input_ids": [], "labels": [], "attention_mask": [],
                                "spans": []}
    for i, (index, length) in enumerate(zip(order, lengths)):
        profile = profiles[index]
        offset = text.offset
        row = chat_row(text, int(length), profile, rng)
        columns["id"].append(f"{profile.dataset}-{split}-{i:06d}")
        columns["source"].append({"dataset": profile.dataset, "language": profile.language,
                                  "exercise": profile.exercise,
                                  "meta_json": json.dumps({"text_byte_offset": offset, "text_wraps": text.wraps})})
        for key in ("input_ids", "labels", "attention_mask", "spans"):
            columns[key].append(row[key])
    return columns


def features():
    from datasets import Features, List, Value

    text, i32 = Value("string"), Value("int32")
    return Features({
        "id": text,
        "source": {"dataset": text, "language": text, "exercise": text, "meta_json": text},
        "input_ids": List(i32), "labels": List(i32), "attention_mask": List(i32),
        "spans": {"assistant_token_start": i32, "analysis_token_count": i32, "final_token_count": i32},
    })


def text_bytes_needed(shape: MixShape) -> int:
    mean_len = (shape.max_len - shape.min_len) / max(math.log(shape.max_len / shape.min_len), 1e-9)
    # Files go to validation by a hash of their path (a few percent of the bytes in the first megabytes).
    return max(int(1.2 * BYTES_PER_TOKEN * mean_len * max(shape.rows_train, 30 * shape.rows_validation)), 2_000_000)


def build_chat_mix(out_dir: Path, shape: MixShape) -> dict:
    """Writes the DatasetDict to `out_dir` and returns what it holds."""
    from datasets import Dataset, DatasetDict, disable_progress_bars

    from demo.tiny_corpus import read_split_texts

    disable_progress_bars()
    train_texts, validation_texts = read_split_texts(text_bytes_needed(shape))
    summary = {}
    splits = {}
    for split_seed, (split, rows, texts) in enumerate((("train", shape.rows_train, train_texts),
                                                       ("validation", shape.rows_validation, validation_texts))):
        stream = ByteTokens(texts, shape.vocab_size)
        columns = build_split(split, rows, stream, shape, split_seed)
        splits[split] = Dataset.from_dict(columns, features=features())
        summary[split] = split_summary(columns, stream)
    DatasetDict(splits).save_to_disk(str(out_dir))
    return summary


def split_summary(columns: dict[str, list], stream: ByteTokens) -> dict:
    lengths = np.array([len(ids) for ids in columns["input_ids"]])
    sources: dict[str, int] = {}
    for source in columns["source"]:
        sources[source["dataset"]] = sources.get(source["dataset"], 0) + 1
    return {"rows": len(lengths), "tokens": int(lengths.sum()), "mean_len": float(lengths.mean()),
            "min_len": int(lengths.min()), "median_len": float(np.median(lengths)), "max_len": int(lengths.max()),
            "rows_per_source": sources, "text_bytes": len(stream.data), "text_wraps": stream.wraps}

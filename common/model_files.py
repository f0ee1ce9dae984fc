"""Model weights are read from safetensors only.

`pytorch_model.bin`, `*.pt`, `*.pth`, `*.ckpt` and `*.pkl` are pickles: loading
one can run code that the file carries (torch's weights-only unpickler narrows
that, it does not make a handed-over file trustworthy). A model directory whose
weights exist only in such files is refused by name before anything is loaded,
and the loaders are asked for safetensors even where both formats are present.
"""

from __future__ import annotations

import json
from pathlib import Path

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickled_weight_files(model_dir: str | Path) -> list[str]:
    """Names of pickle-format weight files in `model_dir` (not recursive)."""
    return sorted(p.name for p in Path(model_dir).iterdir() if p.is_file() and p.name.endswith(PICKLE_WEIGHT_SUFFIXES))


def require_safetensors(model_dir: str | Path, what: str) -> None:
    """ValueError naming the pickle weight files of a local model directory that has no safetensors.

    A path that is not a directory (a hub id, or nothing) is left to the loader's own error.
    """
    path = Path(model_dir).expanduser()
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickled = pickled_weight_files(path)
    if pickled:
        raise ValueError(f"{what} {model_dir}: its weights are {', '.join(pickled)}, a pickle format that vpmoe does "
                         "not load (unpickling can run code); convert them to safetensors where the file is trusted "
                         "(AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))")


SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(model_dir: Path, what: str = "student.path") -> list[Path]:
    """The checkpoint's safetensors files; ValueError naming the directory (and any pickle weight
    files it holds instead) when there are none."""
    model_dir = Path(model_dir)
    require_safetensors(model_dir, what)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc})") from None
        files = [(model_dir / name).resolve() for name in names]
        outside = [f for f in files if model_dir.resolve() not in f.parents]
        if outside:
            raise ValueError(f"{index}: names {outside[0]}, outside {model_dir}")
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index}: names {missing[0].name}, which is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{what} {model_dir}: no *.safetensors weights")
    return files

"""Where a dataset's rows live: ``dataset.path`` resolved to an ordered list of shards.

``dataset.path`` may be one JSONL/Parquet file, a folder or glob of them, a folder a
``datasets.save_to_disk`` wrote, or a Hugging Face dataset name found in the local
Hugging Face cache (offline: compute nodes have no internet). Each shard is read by
:mod:`.source` in batches, so no source is ever loaded whole. The order is fixed
(sorted paths; the order ``datasets`` keeps its files in), so ids and resume are the
same for every source.

``dataset.split`` picks a split: for a saved ``DatasetDict`` or a cached HF dataset,
the split of that name; for a folder or glob, the files whose relative path has a
folder named after it or whose name starts with it (``train.jsonl``,
``data/train-00000-of-00002.parquet``, ``train/part-0.jsonl``): Hugging Face's own layout.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["DatasetError", "Shard", "resolve_shards", "shard_format", "require_datasets"]

log = logging.getLogger(__name__)

Format = Literal["jsonl", "parquet", "arrow"]
_SUFFIX: dict[str, Format] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DatasetError(RuntimeError):
    """The dataset as a whole cannot be read (missing file, unknown format)."""


@dataclass(frozen=True, slots=True)
class Shard:
    path: Path
    format: Format
    label: str
    """How row errors name this shard (its path relative to the dataset, or its file name)."""


def require_datasets() -> object:
    """The ``datasets`` library, imported on first use (it is heavy and optional)."""
    try:
        import datasets
    except ImportError:
        raise DatasetError("dataset.path: this source needs the Hugging Face `datasets` library: pip install 'matrix-hpc[hf]'") from None
    return datasets


def shard_format(path: Path, fmt: str) -> Format:
    if fmt != "auto":
        return fmt  # type: ignore[return-value]
    found = _SUFFIX.get(path.suffix.lower())
    if found is None:
        raise DatasetError(f"dataset.path: cannot tell the format of {path.name} (set dataset.format to jsonl or parquet)")
    return found


def _in_split(rel: Path, split: str) -> bool:
    if split in rel.parts[:-1]:
        return True
    name = rel.name
    return name == split or any(name.startswith(split + sep) for sep in ("-", "_", "."))


def _files(base: Path, candidates: list[Path], fmt: str, split: str | None, what: str) -> list[Shard]:
    files = sorted(p for p in candidates if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts))
    if fmt == "auto":
        files = [p for p in files if p.suffix.lower() in _SUFFIX]
    if split is not None:
        picked = [p for p in files if _in_split(p.relative_to(base), split)]
        if not picked and files:
            raise DatasetError(f"dataset.split: no file of {what} belongs to split {split!r} (a folder {split}/ or a name starting {split}-)")
        files = picked
    if not files:
        raise DatasetError(f"dataset.path: no JSONL or Parquet files in {what}")
    return [Shard(p, shard_format(p, fmt), str(p.relative_to(base))) for p in files]


def _arrow_shards(ds: object, split: str | None, what: str) -> list[Shard]:
    """The Arrow files behind a loaded ``Dataset``/``DatasetDict`` (memory-mapped by
    ``datasets``; read here batch by batch)."""
    if hasattr(ds, "keys") and not hasattr(ds, "cache_files") or isinstance(getattr(ds, "cache_files", None), dict):
        splits = list(ds.keys())  # type: ignore[attr-defined]
        if split is None:
            if len(splits) != 1:
                raise DatasetError(f"dataset.split: {what} has splits {', '.join(splits)}; name one")
            split = splits[0]
        if split not in splits:
            raise DatasetError(f"dataset.split: {what} has no split {split!r} (it has {', '.join(splits)})")
        ds = ds[split]  # type: ignore[index]
    elif split is not None and getattr(ds, "split", None) not in (None, split):
        raise DatasetError(f"dataset.split: {what} holds split {ds.split!r}, not {split!r}")  # type: ignore[attr-defined]
    if getattr(ds, "_indices", None) is not None:
        raise DatasetError(f"dataset.path: {what} has an indices mapping; save it with flatten_indices() first")
    files = [Path(f["filename"]) for f in ds.cache_files]  # type: ignore[attr-defined]
    if not files and len(ds):  # type: ignore[arg-type]
        raise DatasetError(f"dataset.path: {what} is held in memory, not in Arrow files")
    return [Shard(p, "arrow", p.name) for p in files]


def _saved(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def resolve_shards(path: Path, fmt: str = "auto", split: str | None = None, raw: str | None = None) -> list[Shard]:
    """``path`` as its shards, in a fixed order. ``raw``: the path as the user wrote it
    (a Hugging Face name is tried when no file or folder matches)."""
    text = str(path)
    if glob.has_magic(text):
        base = Path(text[: min(i for i in (text.find(c) for c in "*?[") if i >= 0)]).parent if not path.exists() else path.parent
        matches = [Path(p) for p in glob.glob(text, recursive=True)]
        if not matches:
            raise DatasetError(f"dataset.path: no file matches {text}")
        return _files(base, matches, fmt, split, text)
    if path.is_file():
        if split is not None:
            log.info("dataset.split=%s ignored: %s is one file", split, path)
        return [Shard(path, shard_format(path, fmt), path.name)]
    if path.is_dir():
        if _saved(path):
            datasets = require_datasets()
            try:
                ds = datasets.load_from_disk(str(path))  # type: ignore[attr-defined]
            except Exception as exc:
                raise DatasetError(f"dataset.path: cannot load {path} saved by datasets ({type(exc).__name__}: {exc})") from None
            return _arrow_shards(ds, split, str(path))
        return _files(path, list(path.rglob("*")), fmt, split, str(path))
    name = raw if raw is not None else text
    if _HUB_NAME.match(name) and not name.startswith("."):
        return _hub_shards(name, split)
    raise DatasetError(f"dataset.path: no such file {path}")


def _hub_shards(name: str, split: str | None) -> list[Shard]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a compute node has no internet: the cache or nothing (read at import)
    datasets = require_datasets()
    try:
        ds = datasets.load_dataset(name, split=split)  # type: ignore[attr-defined]
    except Exception as exc:
        cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "datasets")
        raise DatasetError(
            f"dataset.path: no such file or folder {name!r}, and no dataset of that name in the local Hugging Face cache "
            f"{cache} ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})"
        ) from None
    return _arrow_shards(ds, None, f"Hugging Face dataset {name!r}")

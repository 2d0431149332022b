"""``export --format hf``: a folder the Hugging Face ecosystem reads with no glue.

``DIR/data/train-00000-of-0000N.parquet`` (the Hub's own shard names, so
``datasets.load_dataset("parquet", data_dir=DIR)`` and ``load_dataset(DIR)`` both find
them) and ``DIR/README.md``, a dataset card whose YAML says what made the data: the
workflow, each role's model and sampling, counts by status and failure kind, token
statistics per role and model, the run's config and the code version. The columns are
the Parquet export's (:mod:`.export`) plus ``messages`` (:mod:`.messages`).

Shards close at about :data:`MAX_SHARD_BYTES` (the Hub's Parquet conversion and
``push_to_hub`` keep shards under 500 MB); rows stream through in row groups.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .export import ROW_GROUP, Selection, _batches, _infer_types, _Misfit, arrow_table, unplaced
from .messages import record_messages
from .tokens import TokenUsage
from .zarr_store import StoreReader

__all__ = ["HFExportResult", "MAX_SHARD_BYTES", "export_hf"]

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 500 * 1024 * 1024
SPLIT = "train"


@dataclass
class HFExportResult:
    records: int
    shards: list[Path] = field(default_factory=list)
    json_columns: list[str] = field(default_factory=list)
    unplaced: int = 0
    """With ``Selection.order``: records whose id the dataset does not hold (written last)."""


@dataclass
class _Stats:
    by_status: Counter = field(default_factory=Counter)
    failed_by_kind: Counter = field(default_factory=Counter)
    tokens: dict[tuple[str, str], TokenUsage] = field(default_factory=dict)
    """Each (role, model)'s LLM calls."""
    max_completion: Counter = field(default_factory=Counter)
    """Each (role, model)'s longest completion."""

    def add(self, rec: dict[str, Any]) -> None:
        self.by_status[rec.get("status")] += 1
        if rec.get("error_kind"):
            self.failed_by_kind[rec["error_kind"]] += 1
        for t in rec.get("turns") or []:
            if not isinstance(t, dict) or t.get("model") is None:
                continue  # a step that called no LLM
            key, call = (str(t.get("role")), str(t.get("model"))), TokenUsage.of_turn(t)
            self.tokens[key] = self.tokens.get(key, TokenUsage()) + call
            self.max_completion[key] = max(self.max_completion[key], call.completion_tokens)


def _messages_type() -> Any:
    import pyarrow as pa

    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def export_hf(
    root: str | Path,
    to: str | Path,
    status: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    row_group: int = ROW_GROUP,
    sel: Selection | None = None,
) -> HFExportResult:
    """Write the committed records (optionally only ``status``; ``sel``: the other options) as a Hugging Face dataset folder."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    reader = StoreReader(root)
    sel = sel or Selection(status)
    status = sel.status
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    extra = lambda rec: {"messages": record_messages(rec)}  # noqa: E731
    json_cols: set[str] = set()
    while True:  # a column that fails to convert in the second pass is retried as JSON text
        names, types = _infer_types(lambda: _batches(reader, sel, extra, row_group), json_cols)
        types["messages"] = _messages_type()
        schema = pa.schema([(n, pa.string() if n in json_cols else types.get(n, pa.null())) for n in names])
        tmp = Path(f"{to}/.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        stats, shards, n = _Stats(), [], 0
        writer = None
        try:
            for batch in _batches(reader, sel, extra, row_group):
                if writer is None:
                    shards.append(tmp / f"{len(shards)}.parquet")
                    writer = pq.ParquetWriter(shards[-1], schema)
                writer.write_table(arrow_table(batch, schema, json_cols), row_group_size=row_group)
                for r in batch:
                    stats.add(r)
                n += len(batch)
                if shards[-1].stat().st_size >= max_shard_bytes:  # a row group is on disk once written
                    writer.close()
                    writer = None
            if writer is None and not shards:  # no record: one empty shard keeps the schema
                shards.append(tmp / "0.parquet")
                writer = pq.ParquetWriter(shards[-1], schema)
            if writer is not None:
                writer.close()
        except _Misfit as exc:
            if writer is not None:
                writer.close()
            shutil.rmtree(tmp, ignore_errors=True)
            json_cols.add(exc.column)
            continue
        break
    data = to / "data"
    data.mkdir(exist_ok=True)
    for old in data.glob(f"{SPLIT}-*-of-*.parquet"):  # an earlier export's shards
        old.unlink()
    final = [data / f"{SPLIT}-{i:05d}-of-{len(shards):05d}.parquet" for i in range(len(shards))]
    for src, dst in zip(shards, final):
        src.replace(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    (to / "README.md").write_text(dataset_card(reader.run_info(), stats, n, sorted(json_cols), len(final), status), encoding="utf-8")
    if json_cols:
        log.info("export: columns %s written as JSON text", sorted(json_cols))
    return HFExportResult(n, final, sorted(json_cols), unplaced(reader, sel))


def code_version() -> str:
    """``git describe`` of the checkout this package runs from, else the package's version."""
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "-C", str(here), "describe", "--tags", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
        if res.returncode == 0 and res.stdout.strip():
            return f"git {res.stdout.strip()}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"matrix-hpc {version('matrix-hpc')}"
    except PackageNotFoundError:
        return "unknown"


def _roles(config: dict[str, Any]) -> dict[str, Any]:
    """Each role's model (its key, engine and name) and sampling (the role's own keys over the model's defaults)."""
    models = config.get("models") or {}
    out: dict[str, Any] = {}
    for name, role in ((config.get("workflow") or {}).get("roles") or {}).items():
        key = role.get("model") or (next(iter(models)) if len(models) == 1 else None)
        model = models.get(key) or {}
        sampling = {k: model.get(k) for k in ("max_tokens", "temperature") if model.get(k) is not None}
        sampling.update({k: v for k, v in (role.get("sampling") or {}).items() if v not in (None, {}, []) and v is not False})  # unset or off
        out[name] = (
            {"agent": role.get("agent"), "model": key, "engine": model.get("engine"), "served_model": model.get("model"), "sampling": sampling}
            if key
            else {"agent": role.get("agent"), "model": None}
        )
    return out


def dataset_card(run: dict[str, Any], stats: _Stats, n: int, json_cols: list[str], shards: int, status: str | None) -> str:
    import yaml

    config = run.get("config") or {}
    workflow = (config.get("workflow") or {}).get("name")
    tokens = defaultdict(dict)
    for (role, model), u in sorted(stats.tokens.items()):
        tokens[role][model] = {
            "calls": u.calls, **u.token_counts(), "max_completion_tokens": stats.max_completion[(role, model)],
            "mean_completion_tokens": round(u.completion_tokens / u.calls, 2) if u.calls else 0,
        }  # fmt: skip
    meta = {
        "configs": [{"config_name": "default", "data_files": [{"split": SPLIT, "path": f"data/{SPLIT}-*"}]}],
        "tags": ["synthetic", "matrix-hpc"] + ([workflow] if workflow else []),
        "size_categories": [_size_category(n)],
        "matrix_hpc": {
            "workflow": workflow,
            "code_version": code_version(),
            "run_id": run.get("run_id"),
            "records": n,
            "exported_status": status or "all",
            "by_status": dict(stats.by_status.most_common()),
            "failed_by_kind": dict(stats.failed_by_kind.most_common()),
            "roles": _roles(config),
            "tokens": dict(tokens),
            "json_columns": json_cols,
            "config": config,
        },
    }
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    body = (
        f"# {workflow or 'matrix-hpc'} synthetic data\n\n"
        f"{n} records made by the `{workflow}` workflow of matrix-hpc ({meta['matrix_hpc']['code_version']}), "
        f"in {shards} Parquet shard(s) under `data/`.\n\n"
        '```python\nimport datasets\nds = datasets.load_dataset("parquet", data_dir="THIS_FOLDER", split="train")\n```\n\n'
        "`messages` holds each dialogue as `[{role, content}]` (the row's prompt as `user`, the role that spoke last as "
        "`assistant`, the other roles as `user`); the other columns are the records as the run stored them. "
        "The YAML above (`matrix_hpc`) holds the config that made the data, each role's model and sampling, "
        "counts by status and failure kind, and token statistics per role and model.\n"
    )
    return f"---\n{head}---\n\n{body}"


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < bound:
            return name
    return "10M<n<100M"

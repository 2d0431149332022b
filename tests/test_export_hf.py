"""``matrix-hpc export OUTPUT --format hf --to DIR`` (issue 24, data out): sharded Parquet
under ``data/train-*-of-*.parquet`` that the real ``datasets`` library loads with no glue,
a ``messages`` column, and a dataset card whose YAML counts what the store holds.

The store is written by the real StoreWriter (as test_view's); every exported row is
checked against it.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from matrix_hpc.store import RecordRow, StoreReader, StoreWriter
from matrix_hpc.store.hf_export import export_hf

from .conftest import BIN, write_config

datasets = pytest.importorskip("datasets")

DEEP = 60  # lists nested this deep: a Parquet schema past the readers' limit of 100 levels


def _deep(n: int) -> Any:
    v: Any = "bottom"
    for _ in range(n):
        v = [v]
    return v


def _record(i: int) -> dict[str, Any]:
    failed = i % 9 == 4
    roles = ["teacher", "student"] if i % 3 else ["teacher"]
    turns = [
        {"role": r, "text": f"{r} says {i}", "prompt_tokens": 10 + i % 7, "completion_tokens": 3 + i % 5, "latency_s": 0.1, "model": "big" if r == "teacher" else "small",
         "endpoint": "http://127.0.0.1:9/v1", "served_model": "m", "max_tokens": 32, "temperature": 0.5, "error": None, "replayed": False}
        for r in roles
    ]  # fmt: skip
    if i == 10:
        turns.append({**turns[-1], "text": "", "error": "llm_timeout", "completion_tokens": 0})  # a failed call: not a message
    row: dict[str, Any] = {"id": f"r{i:03d}", "question": f"what is {i}?", "n": i}
    if i == 5:
        row = {"id": "r005", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    rec: dict[str, Any] = {
        "id": f"r{i:03d}", "status": "failed" if failed else "ok",
        "error": {"kind": ["bad_input", "agent_error"][i % 2], "message": f"failure {i}", "role": "teacher"} if failed else None,
        "row": row, "result": None if failed else {"answer": i, "deep": _deep(DEEP) if i == 12 else None}, "turns": turns, "attempt": 1, "hops": len(turns),
        "created_at": 1000.0 + i, "finished_at": 2000.0 + i,
        "usage": {"prompt_tokens": sum(t["prompt_tokens"] for t in turns), "completion_tokens": sum(t["completion_tokens"] for t in turns)},
    }  # fmt: skip
    return rec


RECORDS = [_record(i) for i in range(60)]


def _expected_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    """The documented mapping (docs/hf-export.md), written out for this test's shapes."""
    if rec["id"] == "r005":
        opening = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    else:
        opening = [{"role": "user", "content": rec["row"]["question"]}]
    spoken = [t for t in rec["turns"] if not t["error"]]
    if len(spoken) == 1:
        return opening + [{"role": "assistant", "content": spoken[0]["text"]}]
    return opening + [{"role": "user", "content": spoken[0]["text"]}, {"role": "assistant", "content": spoken[1]["text"]}]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from matrix_hpc.config import load_config

    tmp = tmp_path_factory.mktemp("hfstore")
    out = tmp / "out"
    for part, recs in ((0, RECORDS[:35]), (1, RECORDS[35:])):
        w = StoreWriter(out, part=part, chunk_rows=16, fsync=False)
        w.append([RecordRow.from_record(r) for r in recs])
        w.commit()
        w.close()
    cfg = write_config(tmp, {
        "workflow": {"name": "collab", "entry": "teacher", "roles": {
            "teacher": {"agent": "a:T", "model": "big", "sampling": {"temperature": 0.2, "top_p": 0.9}},
            "student": {"agent": "a:S", "model": "small"}}},
        "dataset": {"path": str(tmp / "d.jsonl")},
        "models": {"big": {"engine": "external", "base_urls": ["http://127.0.0.1:9/v1"], "max_tokens": 64},
                   "small": {"engine": "external", "base_urls": ["http://127.0.0.1:9/v1"], "temperature": 0.9}},
    }, {})  # fmt: skip
    (tmp / "d.jsonl").write_text("")
    (out / "run.json").write_text(json.dumps({"run_id": "run-1", "config": load_config(cfg).to_dict()}))
    return out


def _card(folder: Path) -> dict[str, Any]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_export_hf_loads_with_datasets_and_matches_the_store(store: Path, tmp_path: Path) -> None:
    to = tmp_path / "hf"
    res = subprocess.run([str(BIN / "matrix-hpc"), "export", str(store), "--format", "hf", "--to", str(to)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in (to / "data").iterdir()) == ["train-00000-of-00001.parquet"]
    stored = {r["id"]: r for r in StoreReader(store).iter_records()}
    for ds in (
        datasets.load_dataset("parquet", data_dir=str(to), split="train", cache_dir=str(tmp_path / "cache")),
        datasets.load_dataset(str(to), split="train", cache_dir=str(tmp_path / "cache2")),  # the card's configs: data/train-*
    ):
        assert len(ds) == len(stored) == 60
        for row in ds:
            rec = stored[row["id"]]
            assert row["status"] == rec["status"] and row["error_kind"] == (rec["error"] or {}).get("kind")
            assert row["messages"] == _expected_messages(rec)
            assert [t["text"] for t in row["turns"]] == [t["text"] for t in rec["turns"]]
            assert row["prompt_tokens"] == rec["usage"]["prompt_tokens"] and row["completion_tokens"] == rec["usage"]["completion_tokens"]
            assert _same({k: v for k, v in row["row"].items() if v is not None}, rec["row"])
            # result holds a value too deep for Parquet: JSON text, the same value
            assert (row["result"] is None) == (rec["result"] is None) and (row["result"] is None or _same(json.loads(row["result"]), rec["result"]))
    card = _card(to)["matrix_hpc"]
    assert card["workflow"] == "collab" and card["records"] == 60 and card["code_version"].startswith(("git ", "matrix-hpc "))
    assert card["by_status"] == dict(Counter(r["status"] for r in RECORDS))
    assert card["failed_by_kind"] == dict(Counter(r["error"]["kind"] for r in RECORDS if r["error"]))
    assert card["roles"]["teacher"]["model"] == "big" and card["roles"]["teacher"]["sampling"] == {"max_tokens": 64, "temperature": 0.2, "top_p": 0.9}
    assert card["roles"]["student"]["sampling"] == {"max_tokens": 256, "temperature": 0.9}
    calls = Counter((t["role"], t["model"]) for r in RECORDS for t in r["turns"])
    for (role, model), n in calls.items():
        s = card["tokens"][role][model]
        assert s["calls"] == n
        assert s["completion_tokens"] == sum(t["completion_tokens"] for r in RECORDS for t in r["turns"] if t["role"] == role)
    assert card["config"]["workflow"]["name"] == "collab" and card["json_columns"] == ["result"]


def test_export_hf_shards_and_status(store: Path, tmp_path: Path) -> None:
    """Small shards (one row group each) named as the Hub names them; a re-export replaces
    the shards; ``status`` keeps one kind; every shard reads back with pyarrow."""
    to = tmp_path / "hf"
    res = export_hf(store, to, max_shard_bytes=1, row_group=16)
    assert [p.name for p in res.shards] == [f"train-0000{i}-of-00004.parquet" for i in range(4)] and res.records == 60
    assert sum(pq.read_table(p).num_rows for p in res.shards) == 60
    ds = datasets.load_dataset("parquet", data_dir=str(to), split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(ds["id"]) == sorted(r["id"] for r in RECORDS)
    ok = export_hf(store, to, status="ok")
    assert [p.name for p in (to / "data").iterdir()] == ["train-00000-of-00001.parquet"]
    n_ok = sum(r["status"] == "ok" for r in RECORDS)
    assert ok.records == n_ok and _card(to)["matrix_hpc"]["by_status"] == {"ok": n_ok}
    assert not [p for p in to.iterdir() if p.name.startswith(".partial")]


def test_parquet_export_writes_too_deep_values_as_json_text(store: Path, tmp_path: Path) -> None:
    """The plain Parquet export (the same type inference): a value nested past Parquet's
    schema limit goes as JSON text, so the file reads back."""
    res = subprocess.run(
        [str(BIN / "matrix-hpc"), "export", str(store), "--format", "parquet", "--to", str(tmp_path / "x.parquet")], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    table = pq.read_table(tmp_path / "x.parquet")
    deep = [json.loads(v) for i, v in zip(table["id"].to_pylist(), table["result"].to_pylist()) if i == "r012"][0]
    assert deep["deep"] == _deep(DEEP) and not math.isnan(table.num_rows)

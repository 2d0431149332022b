"""Dataset sources beyond one file (issue 24, data in): a folder or glob of JSONL/Parquet
shards, a folder ``datasets.save_to_disk`` wrote, a Hugging Face dataset name found in a
(temporary) local HF cache offline; ``dataset.split`` and ``dataset.columns``; and a
real ``matrix-hpc run`` over a sharded folder, killed and resumed: every id once.

Every dataset here is made by the real ``datasets`` library or pyarrow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from matrix_hpc.runtime.source import DatasetError, SourceOptions, columns_option, count_rows, iter_tasks, scan_dataset

from .conftest import REPO, committed_rows, store_records, wait_for, write_config, write_jsonl

datasets = pytest.importorskip("datasets")


def opts(path: Path | str, **kw: Any) -> SourceOptions:
    return SourceOptions(path=Path(path), entry_role="first", **kw)


def rows(lo: int, hi: int) -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "question": f"question {i}", "n": i, "big": "x" * 50} for i in range(lo, hi)]


def sharded(root: Path) -> Path:
    """data/train-0000{0,1}-of-00002.parquet, data/train-extra.jsonl (one bad line, one
    duplicate id), data/test-00000-of-00001.parquet: HF's layout."""
    data = root / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows(0, 10)), data / "train-00000-of-00002.parquet", row_group_size=4)
    pq.write_table(pa.Table.from_pylist(rows(10, 20)), data / "train-00001-of-00002.parquet")
    write_jsonl(data / "train-extra.jsonl", [*rows(20, 23), '{"id": "broken', {"id": "q3", "question": "dup"}])
    pq.write_table(pa.Table.from_pylist(rows(100, 105)), data / "test-00000-of-00001.parquet")
    (data / ".hidden.parquet").write_bytes(b"not parquet")  # hidden files are not shards
    return root


def test_folder_and_glob_of_shards_with_split_and_columns(tmp_path: Path) -> None:
    root = sharded(tmp_path / "ds")
    everything = list(iter_tasks(opts(root)))
    assert len(everything) == 10 + 10 + 5 + 5 and count_rows(opts(root)) == 30
    train = list(iter_tasks(opts(root, split="train")))
    ok = [t for t in train if t.error is None]
    assert [t.id for t in ok] == [f"q{i}" for i in range(23)]  # sorted shard order: stable ids and resume
    bad = [t for t in train if t.error is not None]
    assert [t.error.message for t in bad][0].startswith("data/train-extra.jsonl line 4: invalid JSON")
    assert bad[1].id == "q3#dup@data/train-extra.jsonlline5"
    assert bad[1].error.message == "data/train-extra.jsonl line 5: duplicate id 'q3' (first at data/train-00000-of-00002.parquet row 4)"
    assert scan_dataset(opts(root, split="train")).rows == 25
    assert [t.id for t in iter_tasks(opts(root, split="test"))] == [f"q{i}" for i in range(100, 105)]
    # a glob, and columns renamed: the id column is kept, the others dropped
    glob_opts = opts(root / "data" / "train-0000*.parquet", columns=columns_option({"question": "prompt"}))
    got = list(iter_tasks(glob_opts))
    assert len(got) == 20 and got[0].row == {"prompt": "question 0", "id": "q0"}
    assert [t.row for t in iter_tasks(opts(root / "data" / "*.jsonl", columns=columns_option(["n"])))][:1] == [{"n": 20, "id": "q20"}]
    # resume: the done ids are skipped, wherever they live
    done = {t.id for t in train[:12]}
    counts: dict[str, int] = {}
    assert [t.id for t in iter_tasks(opts(root, split="train"), done, counts)] == [t.id for t in train[12:]] and counts["skipped"] == 12
    with pytest.raises(DatasetError, match="dataset.columns: no column 'nope' in data/train-00000-of-00002.parquet"):
        scan_dataset(opts(root, split="train", columns=columns_option(["nope"])))
    with pytest.raises(DatasetError, match="no file of .* belongs to split 'validation'"):
        scan_dataset(opts(root, split="validation"))
    with pytest.raises(DatasetError, match="no file matches"):
        scan_dataset(opts(root / "*.nope"))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_list(rows(0, 2500))  # more than one batch of 1024
    ds.save_to_disk(str(tmp_path / "one"), max_shard_size="60KB")  # several Arrow shards
    assert len(list((tmp_path / "one").glob("*.arrow"))) > 1
    tasks = list(iter_tasks(opts(tmp_path / "one", columns=columns_option(["question"]))))
    assert [t.id for t in tasks] == [f"q{i}" for i in range(2500)] and all(t.error is None for t in tasks)
    assert tasks[7].row == {"question": "question 7", "id": "q7"}
    assert scan_dataset(opts(tmp_path / "one")).rows == 2500
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(0, 5)), "test": datasets.Dataset.from_list(rows(50, 53))})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert [t.id for t in iter_tasks(opts(tmp_path / "dict", split="test"))] == ["q50", "q51", "q52"]
    with pytest.raises(DatasetError, match="has splits .*; name one"):
        scan_dataset(opts(tmp_path / "dict"))
    with pytest.raises(DatasetError, match="has no split 'dev'"):
        scan_dataset(opts(tmp_path / "dict", split="dev"))


_OFFLINE_SCRIPT = """
import json, sys
from pathlib import Path
from matrix_hpc.runtime.source import SourceOptions, iter_tasks, DatasetError
for split in ("train", "test"):
    tasks = list(iter_tasks(SourceOptions(path=Path("org/tiny"), entry_role="first", split=split)))
    print(json.dumps([[t.id, t.row, t.error and t.error.message] for t in tasks]))
try:
    list(iter_tasks(SourceOptions(path=Path("org/absent"), entry_role="first", split="train")))
except DatasetError as exc:
    print("ERROR", exc)
"""


def test_hub_name_from_the_local_cache_offline(tmp_path: Path) -> None:
    """A dataset in a temporary HF cache, laid out as ``load_dataset`` leaves a hub
    dataset (``org___tiny/default/0.0.0/<hash>``), read by name with HF_HUB_OFFLINE=1
    (and no network: the proxy variables point nowhere)."""
    from datasets.packaged_modules.json.json import Json

    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "train.jsonl", rows(0, 4))
    write_jsonl(src / "test.jsonl", rows(40, 42))
    builder = Json(cache_dir=str(tmp_path / "build"), dataset_name="tiny", data_files={"train": [str(src / "train.jsonl")], "test": [str(src / "test.jsonl")]})
    builder.download_and_prepare()
    home = tmp_path / "hf"
    shutil.copytree(builder.cache_dir, home / "datasets" / "org___tiny" / "default" / "0.0.0" / "0123abcd")
    env = {**os.environ, "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_OFFLINE": "1",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # fmt: skip
    res = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    train, test = json.loads(lines[0]), json.loads(lines[1])
    assert [t[0] for t in train] == ["q0", "q1", "q2", "q3"] and train[1][1] == rows(1, 2)[0] and not any(t[2] for t in train)
    assert [t[0] for t in test] == ["q40", "q41"]
    assert lines[2].startswith("ERROR dataset.path: no such file or folder 'org/absent', and no dataset of that name in the local Hugging Face cache")


def test_config_keeps_a_hub_name_and_reads_split_and_columns(tmp_path: Path) -> None:
    from matrix_hpc.config import load_config

    cfg = write_config(tmp_path, {
        "workflow": {"name": "hf", "entry": "copy", "roles": {"copy": {"agent": "tests.hf_agents:Copy"}}},
        "dataset": {"path": "org/tiny", "split": "train", "columns": {"problem": "question"}},
    }, {})  # fmt: skip
    config = load_config(cfg)
    assert config.dataset.path == "org/tiny" and config.dataset.split == "train" and config.dataset.columns == {"problem": "question"}
    (tmp_path / "local.jsonl").write_text("")
    assert load_config(cfg, ["dataset.path=local.jsonl"]).dataset.path == str(Path.cwd() / "local.jsonl")


@pytest.mark.slow
def test_run_over_a_sharded_folder_killed_and_resumed(tmp_path: Path, run_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real run over 3 shards (Parquet and JSONL, one bad line, one duplicate id) with a
    no-LLM agent: killed (SIGKILL) after some commits, run again: every row once."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    root = tmp_path / "ds" / "data"
    root.mkdir(parents=True)
    n = 150
    pq.write_table(pa.Table.from_pylist(rows(0, 60)), root / "train-00000-of-00002.parquet", row_group_size=16)
    pq.write_table(pa.Table.from_pylist(rows(60, 120)), root / "train-00001-of-00002.parquet")
    write_jsonl(root / "train-extra.jsonl", [*rows(120, n - 2), '{"id": "broken', {"id": "q5", "question": "dup"}])
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {
        "workflow": {"name": "hfshards", "entry": "copy", "roles": {"copy": {"agent": "tests.hf_agents:Copy", "concurrency": 4, "params": {"delay_s": 0.1}}}},
        "dataset": {"path": str(tmp_path / "ds"), "split": "train", "columns": ["question", "n"], "required_fields": ["question"]},
        "llm": {"engine": "external", "base_urls": ["http://127.0.0.1:9/v1"]},  # never called
        "output": {"path": str(out), "flush_interval_s": 0.2, "chunk_rows": 8},
        "run": {"max_in_flight": 8, "progress": "log", "progress_interval_s": 1.0},
    }, {})  # fmt: skip
    first = run_factory(cfg)
    wait_for(lambda: committed_rows(out) >= 16, 300, "some commits", first)
    first.kill()
    first.cleanup()
    killed_at = len(store_records(out))
    assert 0 < killed_at < n, killed_at
    second = run_factory(cfg)
    assert second.wait(300) == 0, second.output[-3000:]
    records = store_records(out)
    counts = Counter(r["id"] for r in records)
    expected = {f"q{i}" for i in range(n - 2)} | {"q5#dup@data/train-extra.jsonlline30"}
    assert max(counts.values()) == 1 and expected <= set(counts) and len(counts) == n, sorted(set(counts) - expected)
    by_id = {r["id"]: r for r in records}
    assert by_id["q7"]["status"] == "ok" and by_id["q7"]["row"] == {"question": "question 7", "n": 7, "id": "q7"}
    failed = [r for r in records if r["status"] == "failed"]
    assert sorted(r["error"]["message"].split(":")[0] for r in failed) == ["data/train-extra.jsonl line 29", "data/train-extra.jsonl line 30"]
    assert f"{killed_at} skipped" in second.output or "skipped" in second.output


def test_without_datasets_one_line_names_the_extra(tmp_path: Path) -> None:
    """A save_to_disk folder when ``datasets`` is not installed: one line naming the extra."""
    datasets.Dataset.from_list(rows(0, 3)).save_to_disk(str(tmp_path / "saved"))
    script = (
        "import sys; sys.modules['datasets'] = None\n"  # what an environment without it gives: ImportError
        "from pathlib import Path\nfrom matrix_hpc.runtime.source import SourceOptions, scan_dataset, DatasetError\n"
        f"try:\n    scan_dataset(SourceOptions(path=Path({str(tmp_path / 'saved')!r}), entry_role='x'))\n"
        "except DatasetError as exc:\n    print(exc)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "dataset.path: this source needs the Hugging Face `datasets` library: pip install 'matrix-hpc[hf]'", res.stderr


def test_duplicates_found_across_the_id_index_growing(tmp_path: Path) -> None:
    """The compact id index (a hashed numpy table that doubles as it fills) finds every
    repeat, and where its first row was, across many growths."""
    n = 20_000
    lines: list[dict[str, Any] | str] = [{"id": f"k{i}", "question": "q"} for i in range(n)]
    lines += [{"id": f"k{i}", "question": "again"} for i in range(0, n, 997)]
    tasks = list(iter_tasks(opts(write_jsonl(tmp_path / "d.jsonl", lines))))
    dups = [t for t in tasks if t.error is not None]
    assert len(tasks) == len(lines) and [t.id for t in tasks[:n]] == [f"k{i}" for i in range(n)]
    assert [t.error.message for t in dups] == [f"line {n + j + 1}: duplicate id 'k{i}' (first at line {i + 1})" for j, i in enumerate(range(0, n, 997))]

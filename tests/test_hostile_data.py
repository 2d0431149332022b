"""Hostile text (issue 20): text UTF-8 cannot encode never stops a run.

A lone surrogate (``"\\ud83d"``, half an emoji) in a row, a result or an error message
is replaced by U+FFFD and the record says so (``text_replaced``); a record the store
still cannot write fails alone as ``bad_record`` and the rest of its batch commits.
The end-to-end test runs the real ``matrix-hpc run`` on real Ray and real zarr.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.store import RecordRow, StoreReader, StoreWriter, textsafe
from matrix_hpc.store.journal import JournalEntry, JournalWriter, read_entries

from .conftest import BIN, REPO, ok_rows, private_ray, store_records, write_config

LONE = "\ud83d"  # half of U+1F600: what json.loads makes of the escape "\ud83d"
ESCAPED = "\udcff"  # the byte 0xFF of an invalid UTF-8 line read with errors="surrogateescape"


# --- the policy module --------------------------------------------------------------


def test_clean_text_replaces_each_unencodable_code_point_and_counts_them() -> None:
    assert textsafe.clean_text("plain") == ("plain", 0)
    assert textsafe.clean_text("é ☃ 😀") == ("é ☃ 😀", 0)  # valid non-ASCII is untouched
    assert textsafe.clean_text(f"a{LONE}b{ESCAPED}{ESCAPED}") == ("a\ufffdb\ufffd\ufffd", 3)
    assert not textsafe.encodable(f"x{LONE}") and textsafe.encodable("x😀")


def test_record_json_replaces_and_records_where() -> None:
    record = {"id": "t1", "row": {"text": f"hi {LONE}", f"k{ESCAPED}": ["ok", ESCAPED]}, "error": None}
    text = textsafe.record_json(record)
    text.encode("utf-8")  # the point: it encodes
    got = json.loads(text)
    assert got["row"] == {"text": "hi \ufffd", "k\ufffd": ["ok", "\ufffd"]}
    assert got[textsafe.FIELD] == {"count": 3, "at": ["row.text", "row.k\ufffd", "row.k\ufffd[1]"]}
    assert record["row"]["text"] == f"hi {LONE}"  # the caller's record is not changed
    clean = {"id": "t2", "row": {"text": "fine é"}}
    assert textsafe.record_json(clean) == json.dumps(clean, ensure_ascii=False)  # no field when nothing replaced


def test_clean_copies_only_what_it_changes() -> None:
    msgs = [{"role": "user", "content": "fine"}, {"role": "user", "content": f"x{LONE}"}]
    assert textsafe.clean(msgs[:1]) == (msgs[:1], 0, [])
    same = msgs[:1]
    assert textsafe.clean(same)[0] is same  # nothing replaced: no copy (cheap on a hot path)
    out, n, at = textsafe.clean(msgs)
    assert out[0] is msgs[0] and out[1] == {"role": "user", "content": "x\ufffd"} and (n, at) == (1, ["[1].content"])
    assert msgs[1]["content"] == f"x{LONE}"  # the input is never changed


def test_record_json_keeps_few_paths_but_the_whole_count() -> None:
    record = {"id": "t", "row": {f"f{i}": LONE for i in range(50)}}
    info = json.loads(textsafe.record_json(record))[textsafe.FIELD]
    assert info["count"] == 50 and len(info["at"]) == textsafe.MAX_PATHS


def test_record_json_cleans_text_of_values_json_writes_as_str() -> None:
    class Odd:
        def __str__(self) -> str:
            return f"odd{LONE}"

    got = json.loads(textsafe.record_json({"id": "t", "v": Odd()}))
    assert got["v"] == "odd\ufffd" and got[textsafe.FIELD]["count"] == 1


def test_json_bytes_is_lossless_for_the_journal() -> None:
    obj = {"text": f"a{LONE}b", "ok": "é"}
    data = textsafe.json_bytes(obj)
    assert json.loads(data) == obj  # the same string back, surrogate included
    assert textsafe.json_bytes({"ok": "é"}) == '{"ok":"é"}'.encode()  # the fast path is plain UTF-8


def test_record_row_of_a_record_with_a_lone_surrogate_is_written(tmp_path: Path) -> None:
    row = RecordRow.from_record({"id": "t1", "status": "ok", "row": {"text": LONE}, "error": None})
    w = StoreWriter(tmp_path, chunk_rows=4)
    w.append([row])
    w.close()
    (rec,) = StoreReader(tmp_path).iter_records()
    assert rec["row"]["text"] == "\ufffd" and rec[textsafe.FIELD] == {"count": 1, "at": ["row.text"]}


def test_journal_entry_with_a_lone_surrogate_is_written_and_replays_the_same(tmp_path: Path) -> None:
    import asyncio

    async def main() -> None:
        w = JournalWriter(tmp_path / "a.jnl", fsync=False)
        await w.append(JournalEntry("d1", "t1", {"text": f"reply {LONE}"}))
        await w.close()

    asyncio.run(main())
    ((_, _, entry),) = list(read_entries(tmp_path / "a.jnl"))
    assert entry.payload == {"text": f"reply {LONE}"}


# --- a record the store cannot write fails alone ------------------------------------


def test_unwritable_row_fails_alone_as_bad_record_and_its_batch_commits(tmp_path: Path) -> None:
    """Rows built past from_record's cleaning (a raw surrogate; a token count int64 cannot
    hold): each is stored as a ``bad_record`` failure naming its id, the others as they are."""
    w = StoreWriter(tmp_path, chunk_rows=4)
    w.append(ok_rows(["a0", "a1"]))
    w.commit()  # a committed tail, rewritten with the next batch
    batch = ok_rows(["b0", "b1", "b2", "b3", "b4"])
    batch[1] = RecordRow("b1", "ok", "", json.dumps({"id": "b1", "t": LONE}, ensure_ascii=False), 1.0, 1, 2)
    batch[3] = RecordRow("b3", "ok", "", json.dumps({"id": "b3"}), 1.0, 2**70, 2)
    w.append(batch)
    pending = w.take_pending()
    assert w.write(pending) == 5
    assert [(r.id, r.status, r.error_kind) for r in pending] == [
        ("b0", "ok", ""), ("b1", "failed", "bad_record"), ("b2", "ok", ""), ("b3", "failed", "bad_record"), ("b4", "ok", ""),
    ]  # fmt: skip
    w.close()
    records = {r["id"]: r for r in StoreReader(tmp_path).iter_records()}
    assert sorted(records) == ["a0", "a1", "b0", "b1", "b2", "b3", "b4"]
    assert "'b1'" in records["b1"]["error"]["message"] and "UnicodeEncodeError" in records["b1"]["error"]["message"]
    assert "'b3'" in records["b3"]["error"]["message"] and "prompt_tokens" in records["b3"]["error"]["message"]
    StoreWriter(tmp_path, chunk_rows=4).close()  # the part opens again


def test_sink_commits_the_rest_of_a_batch_around_a_bad_record(tmp_path: Path) -> None:
    """The real sink actor: a batch with an unwritable row commits, its ids are reported
    committed, the row counts as failed (``bad_record``), and commits are not failing."""
    import ray

    from matrix_hpc.runtime.sink import SinkActor

    with private_ray("hostile-sink-test", num_cpus=1):
        sink = SinkActor.remote(str(tmp_path / "out"), 64, 0.05, False, False, 5.0)
        rows = ok_rows([f"r{i}" for i in range(10)])
        rows[4] = RecordRow("r4", "ok", "", json.dumps({"id": "r4", "t": LONE}, ensure_ascii=False), 1.0, 1, 2)
        ray.get(sink.receive.remote(rows))
        ray.get(sink.flush.remote())
        _, received, committed, stats = ray.get(sink.poll.remote(None, 0, 0, 0.0))
        assert sorted(committed) == sorted(r.id for r in rows)
        assert stats.ok == 9 and stats.failed_by_kind == {"bad_record": 1}
        assert stats.commit_error is None and stats.gave_up is None
        ray.get(sink.close.remote())
    assert {r["id"]: r["status"] for r in StoreReader(tmp_path / "out").iter_records()}["r4"] == "failed"


# --- a user's run ----------------------------------------------------------------------


@pytest.fixture
def _repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver and Ray's workers import the test agents from the repository."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def _matrix(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "matrix-hpc"), *args], capture_output=True, text=True, timeout=timeout, start_new_session=True)


def check_exports(out: Path, tmp: Path, n: int) -> list[dict[str, Any]]:
    """Export to JSONL and Parquet with the CLI: every JSONL line is valid UTF-8 JSON."""
    jsonl, parquet = tmp / "x.jsonl", tmp / "x.parquet"
    for fmt, to in (("jsonl", jsonl), ("parquet", parquet)):
        res = _matrix("export", str(out), "--format", fmt, "--to", str(to), timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
    lines = jsonl.read_bytes().splitlines()
    assert len(lines) == n
    exported = [json.loads(line.decode("utf-8")) for line in lines]  # strict: raises on invalid UTF-8
    import pyarrow.parquet as pq

    assert pq.read_table(parquet).num_rows == n
    return exported


@pytest.mark.slow
@pytest.mark.usefixtures("_repo_on_path")
def test_run_with_a_lone_surrogate_in_a_row_finishes_and_records_the_replacement(tmp_path: Path) -> None:
    """220 rows like the issue's, one with ``\\ud83d`` (the JSON escape, as a scraper writes
    it) and one failing with the surrogate in its error message: exit 0, every id once,
    the replacement recorded; a re-run has nothing to do; both exports work."""
    n = 220
    lines = [json.dumps({"id": f"t{i}", "text": f"row {i} é"}) for i in range(n)]
    lines[7] = '{"id": "t7", "text": "half an emoji: \\ud83d!"}'
    lines[9] = '{"id": "t9", "text": "bad \\ud83d", "fail": true}'
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = write_config(tmp_path, {
        "workflow": {"name": "hostile", "entry": "echo", "roles": {"echo": {"agent": "tests.hostile_agents:Echo", "concurrency": 16}}},
        "dataset": {"path": str(data)},
        "llm": {"engine": "external", "base_urls": ["http://127.0.0.1:9/v1"]},  # never called
        "output": {"path": str(tmp_path / "out"), "flush_interval_s": 0.2, "chunk_rows": 64, "commit_retry_s": 30},
        "run": {"max_in_flight": 64, "progress": "log", "progress_interval_s": 1.0},
    }, {})  # fmt: skip
    res = _matrix("run", str(cfg))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "out"
    records = store_records(out)
    counts = Counter(r["id"] for r in records)
    assert set(counts) == {f"t{i}" for i in range(n)} and max(counts.values()) == 1
    by_id = {r["id"]: r for r in records}
    t7 = by_id["t7"]
    assert t7["status"] == "ok", t7["error"]
    assert t7["row"]["text"] == "half an emoji: \ufffd!" and t7["result"]["echo"] == "half an emoji: \ufffd!"
    assert t7[textsafe.FIELD] == {"count": 2, "at": ["row.text", "result.echo"]}
    t9 = by_id["t9"]
    assert t9["status"] == "failed" and t9["error"]["kind"] == "echo_refused" and t9["error"]["message"] == "refused bad \ufffd"
    assert t9[textsafe.FIELD]["count"] == 2
    assert sum(1 for r in records if r["status"] == "ok") == n - 1
    assert not [r for r in records if textsafe.FIELD in r and r["id"] not in ("t7", "t9")]

    again = _matrix("run", str(cfg))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(StoreReader(out)) == n  # nothing redone, nothing added
    assert f"this run:  0 ok, 0 failed, {n} skipped" in again.stdout, again.stdout[-2000:]

    exported = check_exports(out, tmp_path, n)
    assert {r["id"]: r for r in exported}["t7"]["row"]["text"] == "half an emoji: \ufffd!"


# --- hostile LLM replies -----------------------------------------------------------------

# marker -> (status, error kind): what each reply makes of its task, and why
EXPECTED = {
    "[[lone-surrogate]]": ("ok", None),  # the text is usable: replaced and recorded
    "[[invalid-utf8]]": ("ok", None),  # decoded as the source decodes input (surrogateescape), then replaced and recorded
    "[[truncated]]": ("failed", "llm_bad_response"),  # no reply to use; a server bug, so not retried
    "[[no-choices]]": ("failed", "llm_bad_response"),
    "[[not-object]]": ("failed", "llm_bad_response"),
    "[[null-content]]": ("ok", None),  # a valid OpenAI reply (tool-call replies have it): the text is "", the workflow decides
    "[[huge]]": ("ok", None),  # a long answer is an answer
    "[[http500]]": ("failed", "llm_unavailable"),  # retried (llm.max_retries), then given up
    "[[bad-usage]]": ("ok", None),  # token counts that are not counts are 0: accounting, not the answer
}


@pytest.mark.slow
@pytest.mark.usefixtures("_repo_on_path")
def test_hostile_llm_replies_end_their_own_tasks_and_the_run_goes_on(tmp_path: Path) -> None:
    from .hostile_llm import HUGE_CHARS, HostileLLM

    rows: list[dict[str, Any]] = [{"id": f"n{i}", "text": f"question {i}"} for i in range(16)]
    rows.append({"id": "n-surrogate-prompt", "text": f"a prompt with {LONE} in it"})
    for k, marker in enumerate(EXPECTED):
        rows += [{"id": f"m{k}-{j}", "text": f"{marker} please"} for j in range(2)]
    marker_of = {r["id"]: next((m for m in EXPECTED if m in r["text"]), None) for r in rows}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with HostileLLM() as server:
        cfg = write_config(tmp_path, {
            "workflow": {"name": "hostile-llm", "entry": "ask", "roles": {"ask": {"agent": "tests.hostile_agents:Ask", "concurrency": 4}}},
            "dataset": {"path": str(data)},
            "llm": {"engine": "external", "base_urls": [server.url], "max_retries": 1, "retry_backoff_s": 0.05, "timeout_s": 60, "max_tokens": 16},
            "output": {"path": str(tmp_path / "out"), "flush_interval_s": 0.2, "chunk_rows": 16},
            "run": {"max_in_flight": 8, "progress": "log", "progress_interval_s": 1.0},
        }, {})  # fmt: skip
        res = _matrix("run", str(cfg))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        http500_hits = server.hits["[[http500]]"]
    out = tmp_path / "out"
    records = store_records(out)
    counts = Counter(r["id"] for r in records)
    assert set(counts) == set(marker_of) and max(counts.values()) == 1
    for r in records:
        marker = marker_of[r["id"]]
        status, kind = EXPECTED[marker] if marker else ("ok", None)
        assert (r["status"], (r["error"] or {}).get("kind")) == (status, kind), (marker, r["error"])
        if kind == "llm_bad_response":
            assert "http://127.0.0.1" in r["error"]["message"], r["error"]
    by_id = {r["id"]: r for r in records}
    for rid in ("m0-0", "m1-0"):  # the lone surrogate and the invalid byte: replaced, and said so
        assert "\ufffd" in by_id[rid]["turns"][0]["text"] and "turns[0].text" in by_id[rid][textsafe.FIELD]["at"], by_id[rid]
    assert by_id["n-surrogate-prompt"]["turns"][0]["text"].startswith("a fine answer to: a prompt with \ufffd")
    assert "http500" not in by_id["n0"]["turns"][0]["text"] and by_id["n0"]["turns"][0]["text"].startswith("a fine answer")
    huge = by_id[f"m{list(EXPECTED).index('[[huge]]')}-0"]
    assert huge["result"]["reply_chars"] == HUGE_CHARS
    null = by_id[f"m{list(EXPECTED).index('[[null-content]]')}-0"]
    assert null["result"]["reply_chars"] == 0
    usage = by_id[f"m{list(EXPECTED).index('[[bad-usage]]')}-0"]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (0, 0), usage
    http500 = by_id[f"m{list(EXPECTED).index('[[http500]]')}-0"]["error"]["message"]
    assert "HTTP 500" in http500, http500

    assert http500_hits == 2 * 2  # each of its two tasks tried twice (max_retries 1)
    check_exports(out, tmp_path, len(rows))

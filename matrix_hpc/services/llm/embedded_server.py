"""Process entry point of the embedded CPU engine (xllamacpp's in-process llama.cpp server).

Run by :class:`~matrix_hpc.services.llm.embedded.EmbeddedEngine`; serves the OpenAI
API on 127.0.0.1 until it receives SIGTERM/SIGINT (a Slurm USR2 leaves it serving the
run's last tasks: ``matrix_hpc/stopsignals.py``). With a key in ``MATRIX_HPC_ENGINE_API_KEY``
every path but ``/health`` answers 401 to a request without it (llama.cpp's ``api_keys``).
"""

from __future__ import annotations

import argparse
import os
import sys

from ...stopsignals import StopSignals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m matrix_hpc.services.llm.embedded_server")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--n-parallel", type=int, default=16)
    ap.add_argument("--ctx-per-slot", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--served-model-name", default="", help="the name replies carry (default: the file path)")
    args = ap.parse_args(argv)

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model_path
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.n_parallel
    if args.served_model_name:
        params.model_alias = {args.served_model_name}
    params.n_ctx = args.n_parallel * args.ctx_per_slot
    api_key = os.environ.pop("MATRIX_HPC_ENGINE_API_KEY", "")  # see embedded.API_KEY_ENV
    if api_key:
        params.api_keys = [api_key]
    params.endpoint_metrics = True  # /metrics: the engine's own token counts (run.json's engine_stats)
    if args.threads:
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
    stop = StopSignals(notify=None, serving=True)  # INT/TERM stop it; USR2 (Slurm's warning) leaves it serving
    server = xllamacpp.Server(params)  # serves until the object is dropped
    print(f"embedded engine listening on {server.listening_address}", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:  # a second Ctrl-C: stop all the same
        pass
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())

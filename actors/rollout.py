"""The rollout actor: one vLLM engine that samples responses from token ids and takes new weights.

Each method is a thin delegate to ``vllm.LLM``; sampling maths and batching live in the driver.
Create it as a Ray actor (``ray.remote(RolloutEngine)``, usually through ``cluster.ActorGroup``);
vLLM itself is imported only inside the actor process.

On CPU (the vLLM CPU build) the engine runs inside the actor process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
with the ``uni`` executor starts in ~20 s instead of ~70 s with vLLM's own engine and worker processes,
costs no extra processes the Ray scheduler cannot see, and ``collective_rpc`` calls the worker directly.
The KV cache is given in bytes (``kv_cache_memory_bytes``): on CPU ``gpu_memory_utilization`` is a
fraction of *host* memory and its start-up check fails when other processes hold memory.
On GPU vLLM keeps its default engine process; ``tensor_parallel_size > 1`` uses vLLM's ``mp`` executor
inside this actor, which must then hold that many GPUs in one bundle (``cluster/resources.py``).

The driver gives the actor Ray restarts: a restarted engine runs ``__init__`` again (the SFT weights from
disk) and the driver pushes the current weights before using it (``trainers/ppo/``).

Fault injection for tests (``cluster/faults.py``): ``RLHF_FAULT_KILL_ENGINE`` entries
``generate:<seed>@<marker>`` crash the engine at the start of the ``generate`` call with that request seed
(the driver's ``derived_seed(ppo.seed, iteration, engine)``), ``weights:<k>@<marker>`` while it loads the
first bucket of the k-th weight update this engine process received.
"""

from __future__ import annotations

import os
import time
from typing import Any

from actors.vllm_ext import WeightReceiver
from cluster.faults import injector
from trainers.data.chat import eos_ids_of

SAMPLING_KEYS = ("n", "max_new_tokens", "temperature", "top_p", "top_k")
WORKER_EXTENSION = f"{WeightReceiver.__module__}.{WeightReceiver.__qualname__}"


def read_eos_ids(model_path: str) -> list[int]:
    """EOS token ids of a Hugging Face model directory (``generation_config.json`` and ``config.json``
    together, :func:`trainers.data.chat.eos_ids_of`): the stop set of an engine given none.

    The PPO driver and evaluation always pass their own set (``eos_token_ids``), which contains these.
    """
    ids = eos_ids_of(model_path)
    if not ids:
        raise ValueError(f"no eos_token_id in {model_path}/generation_config.json or config.json")
    return list(ids)


def request_seeds(seed: int, num_prompts: int, n: int) -> list[int]:
    """Seed of each prompt's request so that all ``num_prompts * n`` samples differ.

    vLLM gives the j-th of a prompt's n samples the seed ``request_seed + j``, so prompt i starts at
    ``seed + i * n``. The same (seed, prompts) always gives the same samples, whatever the batch.
    """
    return [seed + i * n for i in range(num_prompts)]


def check_token_ids(prompt_token_ids: list[list[int]], vocab_size: int) -> None:
    """ValueError for an empty prompt or an id outside [0, vocab_size).

    vLLM checks ids against the tokenizer, which this engine does not load; an out-of-range id would
    otherwise fail deep inside the model's embedding.
    """
    for i, ids in enumerate(prompt_token_ids):
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def engine_options(device: str, tensor_parallel_size: int, enable_sleep_mode: bool) -> tuple[dict, dict]:
    """(environment variables, extra ``LLM`` kwargs) for an engine on ``device`` ('cpu' or 'cuda').

    CPU, one worker: engine core and worker run inside the actor (in-process ``uni`` executor).
    Tensor parallel: vLLM's ``mp`` workers, on the GPUs Ray gave this actor.
    GPU: the CUDA-IPC weight sync sends rebuild arguments (types, dtypes) into vLLM's engine process,
    which its msgspec channel carries only with the pickle fallback enabled.
    """
    env: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    if device == "cpu" and tensor_parallel_size == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs["distributed_executor_backend"] = "uni"
    elif tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"
    if device != "cpu":
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if enable_sleep_mode:
        kwargs["enable_sleep_mode"] = True
    return env, kwargs


class RolloutEngine:
    """One vLLM engine (tensor-parallel inside) as a Ray actor: generate, take weights, sleep."""

    def __init__(
        self,
        model_path: str,
        *,
        seed: int,
        device: str = "cpu",
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.25,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        enable_sleep_mode: bool = False,
        eos_token_ids: list[int] | None = None,
    ):
        """Start the engine from ``model_path`` (a Hugging Face directory; its tokenizer is not needed).

        ``seed`` seeds the engine's own sampler (requests without a seed); give every engine its own.
        ``eos_token_ids``: the stop ids every request stops at (the PPO driver's stop set,
        docs/ppo_details.md item 28); None reads them from the model directory (:func:`read_eos_ids`).
        """
        start = time.perf_counter()
        self.device = device
        self.eos_token_ids = list(eos_token_ids or read_eos_ids(model_path))
        env, kwargs = engine_options(device, tensor_parallel_size, enable_sleep_mode)
        os.environ.update(env)  # before vLLM is imported in this process
        from vllm import LLM

        self.llm = LLM(
            model_path,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            skip_tokenizer_init=True,
            # Sampled-token log-probs after temperature: the distribution the sampler drew from.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            **kwargs,
        )
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.startup_s = time.perf_counter() - start
        self.sleeping = False
        self.weight_updates = 0  # updates started in this process (fault injection counts them)
        self.weight_groups = 0  # broadcast groups this process joined

    def _params(self, sampling: dict, seed: int | None):
        """vLLM SamplingParams from our sampling dict (keys ``SAMPLING_KEYS``, n defaults to 1)."""
        from vllm import SamplingParams

        unknown = set(sampling) - set(SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"unknown sampling keys {sorted(unknown)}; expected {SAMPLING_KEYS}")
        return SamplingParams(
            n=sampling.get("n", 1),
            max_tokens=sampling["max_new_tokens"],
            temperature=sampling["temperature"],
            top_p=sampling.get("top_p", 1.0),
            top_k=sampling.get("top_k", -1),
            seed=seed,
            stop_token_ids=self.eos_token_ids,
            logprobs=0,
            detokenize=False,
        )

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: dict, seed: int | None = None
    ) -> list[dict]:
        """Sample ``sampling['n']`` responses per prompt; one dict per sample, prompt-major order.

        Each dict: ``prompt_index``, ``token_ids`` (response only; ends with one of ``eos_token_ids``
        when ``finish_reason == 'stop'``), ``logprobs`` (vLLM's log-prob of each sampled token after
        temperature, for the mismatch metric only, docs/ppo_details.md item 5) and ``finish_reason``
        ('stop' or 'length'). ``seed`` None uses the engine's sampler state; an int makes the
        call reproducible (:func:`request_seeds`).
        """
        injector().kill_engine_at(f"generate:{seed}")
        check_token_ids(prompt_token_ids, self.vocab_size)
        n = sampling.get("n", 1)
        if seed is None:
            params: Any = self._params(sampling, None)
        else:
            params = [self._params(sampling, s) for s in request_seeds(seed, len(prompt_token_ids), n)]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            {
                "prompt_index": i,
                "token_ids": list(c.token_ids),
                "finish_reason": c.finish_reason,
                "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)],
            }
            for i, out in enumerate(outputs)
            for c in out.outputs
        ]

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-prob of tokens 1..L-1 of each full sequence given its prefix, at temperature 1. (L-1,) each.

        vLLM applies no temperature to prompt log-probs; compare them with a trained model's at T = 1.
        """
        from vllm import SamplingParams

        check_token_ids(sequences, self.vocab_size)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False
        )
        return [
            [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], s[1:], strict=True)]
            for out, s in zip(outputs, sequences, strict=True)
        ]

    # --- weights: one update = start, one call per bucket, finish (cluster/weight_sync.py) ------

    def _on_workers(self, method, *args) -> list:
        """Run a :class:`WeightReceiver` method on every worker of this engine; one result per worker.

        vLLM's RPC addresses worker methods by name; taking the function keeps the name checked.
        """
        return self.llm.collective_rpc(method.__name__, args=args)

    def start_weight_update(self) -> None:
        """Open a weight update on every worker of this engine."""
        self.weight_updates += 1
        self._on_workers(WeightReceiver.rlhf_start_weight_update)

    def update_weights(self, blob: bytes) -> int:
        """Load one safetensors bucket (CPU transport); returns its tensor count."""
        injector().kill_engine_at(f"weights:{self.weight_updates}")
        return self._on_workers(WeightReceiver.rlhf_load_weight_blob, blob)[0]

    def init_weight_broadcast(
        self,
        master_addr: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 120.0,
    ) -> None:
        """Join (or re-join) the trainer's weight broadcast group (``cluster.weight_sync.BroadcastSync``)."""
        self._on_workers(
            WeightReceiver.rlhf_init_weight_broadcast,
            master_addr,
            master_port,
            rank_offset,
            world_size,
            backend,
            timeout_s,
        )
        self.weight_groups += 1

    def receive_weight_broadcast(self, layout: dict) -> int:
        """Receive one bucket broadcast by the trainer; returns its tensor count."""
        injector().kill_engine_at(f"weights:{self.weight_updates}")
        return self._on_workers(WeightReceiver.rlhf_receive_weight_broadcast, layout)[0]

    def update_weights_ipc(self, names: list[str], handles: list[dict]) -> int:
        """Load one bucket shared through CUDA IPC (colocated GPU transport, not run on CPU)."""
        return self._on_workers(WeightReceiver.rlhf_load_weight_ipc, names, handles)[0]

    def finish_weight_update(self) -> None:
        """Close the update and drop cached prefixes: their KV was computed with the old weights."""
        self._on_workers(WeightReceiver.rlhf_finish_weight_update)
        self.llm.reset_prefix_cache()

    # --- colocated GPU placement -----------------------------------------------------------------

    def sleep(self, level: int = 1) -> bool:
        """Free GPU memory for training (level 1: offload weights, drop KV cache). False on CPU: no-op."""
        if self.device == "cpu":
            return False
        self.llm.sleep(level=level)
        self.sleeping = True
        return True

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Take the GPU memory back after :meth:`sleep`. False on CPU: no-op.

        ``tags=["weights"]`` first, then the weight sync, then ``["kv_cache"]`` keeps the peak low.
        """
        if self.device == "cpu":
            return False
        self.llm.wake_up(tags=tags)
        self.sleeping = tags is not None and "kv_cache" not in tags
        return True

    def health(self) -> dict:
        """Liveness and facts for logs: pid, device, start-up seconds, whether asleep."""
        return {
            "pid": os.getpid(),
            "device": self.device,
            "startup_s": round(self.startup_s, 2),
            "sleeping": self.sleeping,
            "weight_updates": self.weight_updates,
            "weight_groups": self.weight_groups,
            "eos_token_ids": self.eos_token_ids,
        }

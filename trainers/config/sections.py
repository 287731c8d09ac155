"""The config's sections: one dataclass per section, every field declared with :func:`opt` (its one-line
documentation and allowed range or choices, so type checks, range checks and ``rlhf config show --doc``
all read one place). The whole run's :class:`~trainers.config.run.Config` and its cross-field checks are
in :mod:`trainers.config.run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainers.config.transport import TRANSPORTS


def opt(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple | None = None,
) -> Any:
    """Declare a config field with its documentation and allowed values."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "choices": choices}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


PPO_ROLES = ("policy", "critic", "reference", "reward", "reward_function", "rollout")
"""The PPO roles, as ``cluster.role_resources`` and the placement groups name them."""
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
"""Ray's built-in resources: not for ``cluster.role_resources``."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ClusterConfig:
    """Where the run executes and how roles are placed."""

    ray_address: str | None = opt(
        None, "Ray cluster to join ('auto', 'ray://host:10001', ...); None starts a local Ray."
    )
    num_cpus: int | None = opt(
        None, "Logical CPUs for a local Ray (None: detect; more than cores lets small actors coexist).", ge=1
    )
    device: str = opt(
        "auto",
        "Accelerator to use: 'auto' (CUDA if present), 'cpu' or 'cuda'.",
        choices=("auto", "cpu", "cuda"),
    )
    placement: str = opt(
        "dedicated",
        "PPO role placement: 'dedicated' bundles per role, or 'colocated' (share GPUs; vLLM sleeps during training).",
        choices=("dedicated", "colocated"),
    )
    autoscaling: bool = opt(
        False, "The cluster has an autoscaler: a request larger than today's nodes waits instead of failing."
    )
    autoscaler_config: str = opt(
        "auto",
        "The autoscaler's cluster YAML, read for what its node types can ever add (a request beyond it fails at "
        "once): 'auto' is ~/ray_bootstrap_config.yaml if present (ray up leaves it on the head), '' none.",
    )
    placement_timeout_s: float = opt(
        600.0,
        "Seconds to wait for placement groups (e.g. while an autoscaler adds nodes) before giving up.",
        gt=0,
    )
    cpus_per_actor: float = opt(1.0, "Logical CPUs reserved by each actor on a CPU-only cluster.", gt=0)
    role_resources: dict[str, dict] = opt(
        {},
        "Custom Ray resources each PPO actor of a role also reserves, e.g. {rollout: {inference: 1}, '*': {train: 1}} "
        "('*': every role not named): pins roles to the nodes that offer them.",
    )
    torch_threads: int = opt(
        1, "torch intra-op threads per actor on CPU (1 avoids oversubscription on small machines).", ge=1
    )


@dataclass
class ModelConfig:
    """The model a stage starts from."""

    path: str | None = opt(
        None, "Hugging Face model directory to start from (SFT: the base model; PPO: the SFT model)."
    )
    preset: str = opt(
        "tiny", "Architecture preset used when pretraining from scratch (see trainers/runtime/presets.py)."
    )
    tokenizer: str | None = opt(None, "Tokenizer directory (default: model.path, else data.dir/tokenizer).")
    chat_template: str | None = opt(
        None,
        "Jinja chat-template file to use instead of the tokenizer's own (e.g. for a base model that has none); saved with the trained model.",
    )
    max_len: int = opt(
        256, "Longest prompt + response in tokens; see data.overlong for longer examples.", ge=8
    )
    dropout: float = opt(
        0.0,
        "Residual/attention dropout while training (InstructGPT SFT used 0.2; always 0 during RL).",
        ge=0,
        le=0.9,
    )
    dtype: str = opt(
        "auto",
        "Training dtype: 'auto' (fp32 on CPU, bf16 on GPU), 'fp32' or 'bf16'.",
        choices=("auto", "fp32", "bf16"),
    )
    trust_remote_code: bool = opt(
        False, "Allow model code shipped with a checkpoint to run (off: only built-in architectures)."
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")


_KIND_PATH_DOC = (
    "Path of the {kind} data instead of data.dir/{kind}/<split>: a .jsonl/.parquet file or a datasets "
    "save_to_disk directory, with {{split}} standing for train/valid/test."
)


@dataclass
class DataConfig:
    """Input data: DIR/<kind>/<split>.parquet or .jsonl (as `rlhf data synth` writes it), or a path per kind."""

    dir: str | None = opt(
        None, "Data directory with demonstrations/, comparisons/, prompts/, pretrain/ sub-directories."
    )
    demonstrations: str | None = opt(None, _KIND_PATH_DOC.format(kind="demonstrations"))
    comparisons: str | None = opt(None, _KIND_PATH_DOC.format(kind="comparisons"))
    prompts: str | None = opt(None, _KIND_PATH_DOC.format(kind="prompts"))
    pretrain: str | None = opt(None, _KIND_PATH_DOC.format(kind="pretrain"))
    overlong: str = opt(
        "drop",
        "Examples longer than model.max_len: 'drop' them (counted per kind), 'truncate' the prompt from the left, or 'error'.",
        choices=("drop", "truncate", "error"),
    )
    synth_scale: float = opt(1.0, "Size multiplier of the synthetic world (demo and tests).", gt=0)
    seed: int = opt(0, "Seed of the synthetic world and of data shuffling.", ge=0)


@dataclass
class TrainStageConfig:
    """Shared knobs of the Ray Train stages (pretrain, SFT, RM)."""

    num_workers: int = opt(2, "Ray Train workers (data-parallel ranks).", ge=1)
    epochs: int = opt(1, "Passes over the training data.", ge=1)
    max_steps: int = opt(
        -1,
        "Stop after this many optimizer steps (-1: all epochs); the LR schedule still spans all epochs, so raising it and rerunning continues the run.",
        ge=-1,
    )
    micro_batch_size: int = opt(8, "Examples per worker per forward/backward.", ge=1)
    global_batch_size: int = opt(
        32, "Examples per optimizer step over all workers (= micro x workers x accumulation).", ge=1
    )
    lr: float = opt(1e-4, "Peak learning rate.", gt=0)
    min_lr_ratio: float = opt(0.1, "Cosine decay floor as a fraction of lr.", ge=0, le=1)
    warmup_ratio: float = opt(0.05, "Fraction of steps spent in linear warm-up.", ge=0, le=1)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0)
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this (0: off).", ge=0)
    zero_stage: int = opt(3, "DeepSpeed ZeRO stage (0-3).", choices=(0, 1, 2, 3))
    checkpoint_every: int = opt(
        0, "Save a resumable checkpoint every N optimizer steps (0: each epoch end only).", ge=0
    )
    keep_checkpoints: int = opt(2, "How many of the newest checkpoints to keep.", ge=1)
    seed: int = opt(0, "Seed for initialisation and data order.", ge=0)
    max_failures: int = opt(
        0,
        "Ray Train restarts the worker group from the newest checkpoint this many times after a worker failure (-1: unlimited).",
        ge=-1,
    )
    max_nonfinite_steps: int = opt(
        3,
        "Skip an optimizer step whose loss or gradient is NaN/inf; stop the run after this many in a row.",
        ge=1,
    )


@dataclass
class PretrainConfig(TrainStageConfig):
    """Stage 0: next-token prediction on the pretraining corpus (tiny base model, or continued
    pretraining)."""

    lr: float = opt(1e-3, "Peak learning rate.", gt=0)


@dataclass
class SFTConfig(TrainStageConfig):
    """Stage 1: supervised fine-tuning on demonstrations, loss on response tokens only."""

    assistant_turns: str = opt(
        "final",
        "Which assistant turns of a multi-turn conversation are targets: the 'final' one, or 'all'.",
        choices=("final", "all"),
    )

    epochs: int = opt(
        3, "Passes over the demonstrations (InstructGPT: 16 with early stopping on RM score).", ge=1
    )


@dataclass
class RMConfig(TrainStageConfig):
    """Stage 2: reward model on K-way rankings; one batch element = one prompt with all its K responses."""

    micro_batch_size: int = opt(
        4, "Prompts (each with all K responses) per worker per forward/backward.", ge=1
    )
    global_batch_size: int = opt(16, "Prompts per optimizer step over all workers.", ge=1)
    lr: float = opt(5e-5, "Peak learning rate.", gt=0)
    normalize: bool = opt(
        True, "After training, set the head bias so the demonstrations' mean score is 0 (InstructGPT 3.5)."
    )


@dataclass
class RolloutConfig:
    """vLLM rollout engines."""

    num_engines: int = opt(1, "Number of vLLM engines (each one Ray actor, tensor-parallel inside).", ge=1)
    tensor_parallel_size: int = opt(1, "GPUs per engine.", ge=1)
    gpu_memory_utilization: float = opt(
        0.25, "Fraction of device memory for vLLM (on CPU: of host memory for the KV cache).", gt=0, le=1
    )
    kv_cache_mb: int = opt(
        256,
        "KV-cache size per engine in MiB on CPU (vLLM's CPU build sizes it from host memory otherwise).",
        ge=16,
    )
    enforce_eager: bool = opt(True, "Skip CUDA graphs/compilation (faster start, slower decode).")
    max_new_tokens: int = opt(48, "Longest sampled response.", ge=1)
    temperature: float = opt(
        1.0,
        "Sampling temperature; log-probs everywhere divide logits by it (docs/ppo_details.md item 3).",
        gt=0,
    )
    top_p: float = opt(
        1.0, "Nucleus sampling; must stay 1.0 for PPO so log-probs match the sampler.", gt=0, le=1
    )
    top_k: int = opt(-1, "Top-k sampling; must stay -1 (off) for PPO.", ge=-1)
    weight_sync: str = opt(
        "auto",
        "Policy -> engine weight transport: 'broadcast' (gloo on CPU, NCCL on GPU), 'blob' (safetensors through the object store), 'ipc' (CUDA IPC, colocated GPU only); 'auto': ipc on colocated GPUs, broadcast on dedicated GPUs, blob on CPU (measured faster there).",
        choices=TRANSPORTS,
    )


@dataclass
class RewardConfig:
    """Where PPO's scores come from: the learned reward model (also the critic's initialisation), a Python
    function, an HTTP endpoint, or several of them summed with ``weights`` (docs/design.md, issue 15)."""

    path: str | None = opt(
        None, "Reward model directory (output of `rlhf rm`, its model/ folder); source 'rm'."
    )
    function: str | None = opt(
        None,
        "Reward function 'package.module:fn' or 'path/to/file.py:fn', called fn(prompts, responses, rows) -> list[float]; source 'function'.",
    )
    function_workers: int = opt(
        1, "CPU Ray actors that run reward.function, each on a part of the batch.", ge=1
    )
    url: str | None = opt(
        None,
        "HTTP reward endpoint: POST {prompts, responses, rows} as JSON, answer {scores}; source 'url'.",
    )
    url_timeout_s: float = opt(30.0, "Seconds one reward.url request may take.", gt=0)
    url_retries: int = opt(
        3, "Retries of a failed reward.url request (exponential backoff) before the run stops.", ge=0
    )
    weights: dict = opt(
        {},
        "Weight of each source's score in the sum, by name (rm, function, url), e.g. {rm: 1.0, function: 0.5}; unnamed sources weigh 1.",
    )
    score_clip: float = opt(0.0, "Clip the summed score to +-this before shaping (0: off).", ge=0)
    missing_eos_penalty: float = opt(
        0.0,
        "Subtract this from the score of a response that reached rollout.max_new_tokens without a stop token (0: off).",
        ge=0,
    )
    overlong_buffer: int = opt(
        0,
        "DAPO overlong shaping: a linear penalty over the last N tokens before rollout.max_new_tokens (0: off).",
        ge=0,
    )
    overlong_penalty: float = opt(
        1.0, "Penalty at rollout.max_new_tokens with reward.overlong_buffer on.", ge=0
    )

    def sources(self) -> list[str]:
        """The configured score sources, in their fixed order (``rm``, ``function``, ``url``)."""
        given = {"rm": self.path, "function": self.function, "url": self.url}
        return [name for name, value in given.items() if value is not None]


ADVANTAGES = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
"""``ppo.advantage``: GAE with a critic, or a critic-free estimator (trainers/ppo/experience.py)."""
GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
"""The estimators that compare a prompt's samples with each other: they need ``samples_per_prompt >= 2``."""
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "token_sum_norm")
"""``ppo.loss_agg`` (trainers.algos.agg_weights / agg_denominator)."""
REWARD_SOURCES = ("rm", "function", "url")


@dataclass
class PPOConfig:
    """Stage 3: PPO-ptx against the reward model with a per-token KL penalty to the SFT model."""

    iterations: int = opt(20, "PPO iterations (rollout -> experience -> train -> weight sync).", ge=1)
    prompts_per_iteration: int = opt(32, "Prompts sampled per iteration.", ge=1)
    samples_per_prompt: int = opt(1, "Responses sampled per prompt.", ge=1)
    ppo_epochs: int = opt(2, "Passes over each iteration's experience, reshuffled each time.", ge=1)
    mini_batch_size: int = opt(16, "Sequences per optimizer step over all policy ranks.", ge=1)
    micro_batch_size: int = opt(8, "Sequences per rank per forward/backward.", ge=1)
    micro_batch_tokens: int = opt(
        0,
        "Token budget per forward/backward instead of micro_batch_size: rows x (longest prompt + longest response), rows grouped by length, as many micro-batches on every rank (0: off).",
        ge=0,
    )
    policy_lr: float = opt(1e-5, "Policy learning rate.", gt=0)
    critic_lr: float = opt(5e-5, "Critic learning rate.", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay (policy and critic).", ge=0)
    grad_clip: float = opt(1.0, "Global gradient-norm clip (0: off).", ge=0)
    zero_stage: int = opt(3, "DeepSpeed ZeRO stage for policy, critic and reference.", choices=(0, 1, 2, 3))
    offload_params: bool = opt(
        False, "Keep ZeRO-3 parameter partitions in CPU memory (needs ppo.zero_stage=3)."
    )
    offload_optimizer: bool = opt(
        False, "Keep policy/critic AdamW state and master weights in CPU memory, step there (ZeRO-Offload)."
    )
    logprob_chunk_size: int = opt(
        1024, "Positions per float32 log-softmax slice in the actors' log-prob passes (0: whole rows).", ge=0
    )
    kl_coef: float = opt(0.02, "KL penalty coefficient beta (InstructGPT: 0.02).", ge=0)
    kl_estimator: str = opt(
        "k1", "Per-token KL estimator for the reward penalty.", choices=("k1", "k2", "k3")
    )
    adaptive_kl: bool = opt(False, "Adapt beta toward kl_target (Ziegler et al.); fixed beta by default.")
    kl_target: float = opt(6.0, "Target per-sequence KL for the adaptive controller.", gt=0)
    kl_horizon: int = opt(10000, "Adaptive controller horizon in samples.", ge=1)
    gamma: float = opt(1.0, "GAE discount.", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda.", ge=0, le=1)
    advantage: str = opt(
        "gae",
        "Advantage estimator: 'gae' (with a critic, InstructGPT) or critic-free 'grpo', 'dr_grpo', 'rloo', 'reinforce_pp', 'reinforce_pp_baseline'.",
        choices=ADVANTAGES,
    )
    clip_eps: float = opt(0.2, "Policy ratio clip epsilon (the lower side when clip_eps_high is set).", gt=0)
    clip_eps_high: float | None = opt(
        None, "Upper ratio clip (DAPO's clip-higher, e.g. 0.28); None: clip_eps.", gt=0
    )
    kl_loss_coef: float = opt(
        0.0,
        "Weight of KL(policy || reference) as a loss term (GRPO's placement; 0: off); ppo.kl_coef is the KL in the reward.",
        ge=0,
    )
    kl_loss_estimator: str = opt("k3", "KL estimator of the loss term.", choices=("k1", "k2", "k3"))
    loss_agg: str = opt(
        "token_mean",
        "Policy loss aggregation: 'token_mean' over the minibatch, 'seq_mean_token_mean', or Dr.GRPO's 'token_sum_norm' (sum / (sequences x rollout.max_new_tokens)).",
        choices=LOSS_AGGS,
    )
    dynamic_sampling: bool = opt(
        False,
        "DAPO dynamic sampling: drop prompt groups whose scores are all equal, sample further prompts until the batch is full.",
    )
    dynamic_sampling_rounds: int = opt(
        3,
        "Extra sampling rounds per iteration for dynamic sampling; then dropped groups fill the batch.",
        ge=0,
    )
    eval_every: int = opt(
        0, "Evaluate on held-out prompts (prompts/valid) every N iterations and at the end (0: off).", ge=0
    )
    eval_prompts: int = opt(
        64,
        "Held-out prompts per evaluation (the first N of prompts/valid), sampled at rollout.temperature.",
        ge=1,
    )
    value_clip_eps: float = opt(0.2, "Value clip epsilon around the old values.", gt=0)
    ptx_coef: float = opt(
        0.0, "gamma of PPO-ptx: weight of the pretraining LM loss in the same step (0: plain PPO).", ge=0
    )
    ptx_batch_size: int = opt(8, "Pretraining sequences per rank per optimizer step for the ptx term.", ge=1)
    policy_workers: int = opt(2, "Policy ranks (one ZeRO-3 world).", ge=1)
    critic_workers: int = opt(1, "Critic ranks.", ge=1)
    reference_workers: int = opt(1, "Reference (frozen SFT) ranks.", ge=1)
    reward_workers: int = opt(1, "Reward model ranks.", ge=1)
    checkpoint_every: int = opt(
        5, "Save a resumable checkpoint every N iterations (0: only at the end).", ge=0
    )
    keep_checkpoints: int = opt(2, "How many of the newest checkpoints to keep.", ge=1)
    seed: int = opt(0, "Seed for sampling, shuffling and prompt order.", ge=0)
    max_nonfinite_steps: int = opt(
        3,
        "Skip an optimizer step whose loss or gradient is NaN/inf; stop the run after this many in a row.",
        ge=1,
    )
    max_engine_restarts: int = opt(
        3,
        "Times a lost vLLM engine actor is restarted (and the iteration retried) before the run stops.",
        ge=0,
    )


@dataclass
class LoggingConfig:
    """Metrics and progress."""

    log_every: int = opt(1, "Log metrics every N steps/iterations.", ge=1)
    tensorboard: bool = opt(True, "Write TensorBoard events next to metrics.jsonl.")
    progress: bool = opt(True, "Show progress lines while stages run.")
    wandb_project: str | None = opt(
        None, "Also log metrics to this Weights & Biases project (needs the `wandb` package; off when unset)."
    )
    wandb_mode: str = opt(
        "online",
        "Weights & Biases mode when wandb_project is set ('offline' writes runs locally for `wandb sync`).",
        choices=("online", "offline"),
    )

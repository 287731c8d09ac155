"""Evaluation: generation, win rates under a judge, held-out zero-shot accuracy, pretraining loss.

    from trainers.evaluation import generation, heldout, judges, lm_loss
    prompts = generation.read_prompts("world/prompts/test.parquet")
    a = generation.generate("runs/ppo", prompts, max_new_tokens=48, seed=0)
    b = generation.generate("runs/sft", prompts, max_new_tokens=48, seed=0)
    judges.win_rate(prompts, a, b, judges.GoldJudge())      # {'win_rate': 0.61, 'ci_low': ..., ...}
    heldout.heldout_accuracy("runs/ppo", "sentiment", "world")  # FLAN-style zero-shot, rank classification
    lm_loss.pretrain_loss("runs/ppo", texts)                  # alignment tax

Modules: :mod:`~trainers.evaluation.generation` (model directories, sampling with transformers or an
in-process vLLM engine), :mod:`~trainers.evaluation.judges` (gold and RM judges, win rates with Wilson
intervals), :mod:`~trainers.evaluation.heldout` (held-out FLAN accuracy), :mod:`~trainers.evaluation.lm_loss`
(pretraining loss: the alignment tax), :mod:`~trainers.evaluation.report` (the demo's report) and
:mod:`~trainers.evaluation.cli` (``rlhf eval``). This ``__init__`` imports nothing, so the CLI checks
its arguments before torch is loaded.

Importable without Ray, DeepSpeed or vLLM (transformers and vLLM are imported inside the functions
that need them). A *model directory* is a Hugging Face ``save_pretrained`` folder with safetensors
and a tokenizer; a stage's output directory (holding ``model/``) is accepted too
(:func:`resolve_model_dir`).

Decisions:

- **Decoding for evaluation: sampling at T = 1 by default**, seeded. The PPO objective is the
  expected reward of samples drawn at the rollout temperature (``rollout.temperature``, 1.0), and
  InstructGPT's labelers compared sampled outputs at T = 1; greedy decoding would measure a different
  policy (the mode), which for tiny models often loops. ``temperature=0`` gives greedy decoding.
  Sampling is reproducible: the same seed, prompts and batch size give the same outputs.
- **Ties** count half a win. Identical responses to a prompt are a tie without asking the judge
  (a batched forward may differ in the last float bit with the padding around it).
- **Confidence interval**: the 95% Wilson score interval of the tie-as-half score
  ``(wins + ties / 2) / n`` over ``n`` prompts, treating each prompt as one Bernoulli trial. Ties
  have less variance than the coin flip this assumes, so with many ties the interval is
  conservative (wider than needed); it never leaves [0, 1] and is sensible at 0 and 1, unlike the
  normal approximation, and needs no random resampling.
- **Held-out accuracy** (FLAN, Wei et al. 2022): for a prompt with ``OPTIONS`` the model's choice is
  the option with the highest total log-likelihood as the response (rank classification), or with
  ``method="generate"`` the option named first in its greedy response; prompts without options are
  exact match of the greedy response after :func:`normalize_answer`.
"""

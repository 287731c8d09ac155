"""In-process model runtime shared by the Ray Train stages, the PPO actors and evaluation.

- :mod:`~trainers.runtime.device`: which device and dtype a run uses (the one place that decides);
- :mod:`~trainers.runtime.dist`: torch.distributed helpers (rank, world, all-reduce of a few floats);
- :mod:`~trainers.runtime.zero`: the DeepSpeed (ZeRO) wrapper -- config, AdamW groups, LR schedule,
  construction;
- :mod:`~trainers.runtime.step_guard`: optimizer steps skipped alike on every rank when non-finite;
- :mod:`~trainers.runtime.nonfinite`: the drivers' bookkeeping of skipped steps;
- :mod:`~trainers.runtime.export`: gathering ZeRO-3 weights and saving Hugging Face directories;
- :mod:`~trainers.runtime.models`: the causal LM, reward and value models and their forward passes;
- :mod:`~trainers.runtime.presets`: architecture presets for models built from scratch.

Nothing here imports Ray or vLLM; DeepSpeed and transformers are imported inside the functions that
need them, so pure helpers (LR schedule, dtype names) stay cheap to import.
"""

"""The run directory every stage and PPO writes, and the sinks its metrics go to.

Layout of an output directory ``OUT`` (docs/design.md, "Interfaces worth keeping stable")::

    OUT/model/            Hugging Face save_pretrained (safetensors + tokenizer), written atomically
    OUT/metrics.jsonl     one JSON object per logged step ({"step": 3, "epoch": 0, "loss": ...})
    OUT/summary.json      final metrics + wall time
    OUT/config.yaml       the resolved configuration the run used (redacted)
    OUT/checkpoints/      resumable state
    OUT/tensorboard/      TensorBoard events;  OUT/wandb/  Weights & Biases files (when enabled)

Modules: :mod:`~trainers.runs.outdir` (checking and preparing ``OUT``), :mod:`~trainers.runs.metrics`
(``metrics.jsonl`` and the writer that fans records out), :mod:`~trainers.runs.sinks` (TensorBoard and
W&B, built by one factory), :mod:`~trainers.runs.progress` (progress lines). None of them imports the
config: callers pass plain values, so the config can depend on this package and not the other way round.

Files a reader may open at any moment (summary, config, the model directory) are written to a temporary
name and renamed into place (:mod:`trainers.files`); ``metrics.jsonl`` is append-only (one flushed line
per step) and cut back to the checkpoint's step on resume, so a step never appears twice.
"""

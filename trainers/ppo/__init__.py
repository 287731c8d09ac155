"""Stage 3, PPO-ptx: one driver process moving token ids and small per-token tensors between Ray actor groups.

This ``__init__`` imports nothing, so ``rlhf ppo`` (``trainers.ppo.cli``) checks its config before torch,
Ray or DeepSpeed are loaded, and actors can import the batch types without the driver.
"""

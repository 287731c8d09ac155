"""GPU tests: collected everywhere, skipped where CUDA is absent (CI and the CPU dev machines).

Session fixtures (built only when a test that needs them runs, i.e. on a GPU machine):

- ``gpu_ray``: one local Ray for the session, with the machine's GPUs;
- ``policy_dir`` / ``reward_dir``: a Qwen2.5-0.5B-shaped chat model and an RM on its trunk
  (:mod:`tests.gpu.gpu_models`), built in a few seconds, nothing downloaded; under ``$RLHF_GPU_MODELS``
  when set (built once there and reused by later sessions: the device check's steps share them).
"""

import os
import shutil
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_ray():
    """A local Ray with this machine's GPUs (vLLM engines and trainers are its actors); shut down at the end."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` into ``$RLHF_GPU_MODELS/name`` unless an earlier session finished it there (built
    beside it, then renamed: a killed build leaves no half model); without the variable, a fresh folder."""
    shared = os.environ.get("RLHF_GPU_MODELS")
    out = Path(shared) / name if shared else tmp_path_factory.mktemp("qwen05") / name
    if not out.is_dir():
        partial = out.with_name(f"{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        build(partial)
        partial.rename(out)
    return out


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory):
    from tests.gpu.gpu_models import build_policy_dir

    return built_once(tmp_path_factory, "policy", build_policy_dir)


@pytest.fixture(scope="session")
def reward_dir(policy_dir, tmp_path_factory):
    from tests.gpu.gpu_models import build_reward_dir

    return built_once(tmp_path_factory, "rm", lambda out: build_reward_dir(policy_dir, out))

#!/usr/bin/env bash
# The GPU checks in one go (tests/gpu/README.md): environment, every test of tests/gpu/ (the engine tests,
# then the slow PPO loop, in two pytest runs so a slow one cannot take the other's results with it), each
# step under its own time limit, the whole within RLHF_CHECK_BUDGET_S (default 350 s). The iteration
# benchmark (tests/bench/iteration.py) is not run: it measures on CPU only so far (tests/gpu/README.md).
# Results land in $OUT (default .gpu/results):
#   device_check.json   versions, GPU, and each step's exit code, seconds and whether it timed out
#   environment.json    what the environment step found
#   gpu_tests/*.json    what each GPU test measured; engine_tests.xml, ppo_test.xml the pytest reports
#   logs/<step>.log     each step's output
#
#   tests/gpu/device_check.sh            run everything (exit 0: all passed; 1: a step failed; 2: unusable)
#   tests/gpu/device_check.sh --dry-run  check the imports and print the steps; needs no GPU
#
# Environment: RLHF_GPU_SITE the unpacked bundle (put first on PYTHONPATH; unset: the packages are already
# importable); PYTHON (default python3); RLHF_CHECK_BUDGET_S; RLHF_CHECK_ENGINE_S and RLHF_CHECK_PPO_S the
# steps' own limits; RLHF_GPU_MODELS where the test models are built once (default .gpu/models, reused by
# later runs); RLHF_CHECK_NEED_CUDA=0 runs the
# steps without a GPU (to try this script itself on a CPU machine: the tests then skip).
set -uo pipefail

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo" || exit 2
py=${PYTHON:-python3}
out=${OUT:-$repo/.gpu/results}
budget=${RLHF_CHECK_BUDGET_S:-350}
engine_limit=${RLHF_CHECK_ENGINE_S:-130}
ppo_limit=${RLHF_CHECK_PPO_S:-180}
mkdir -p "$out/logs" "$out/gpu_tests" || exit 2

export PYTHONPATH="${RLHF_GPU_SITE:+$RLHF_GPU_SITE:}$repo${PYTHONPATH:+:$PYTHONPATH}"
export RLHF_GPU_RESULTS="$out/gpu_tests"
export RLHF_GPU_MODELS=${RLHF_GPU_MODELS:-$repo/.gpu/models}
# No registry or hub here: everything is built locally, so any download attempt should fail at once.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0

start=$(date +%s)
steps_json=""

left() { echo $((budget - ($(date +%s) - start))); }

# run_step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, budget left), log to logs/NAME.log, record it.
run_step() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  (( remaining < limit )) && limit=$remaining
  if (( limit <= 0 )); then
    echo "== $name: skipped, the ${budget} s budget is spent"
    steps_json+="{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"timed_out\": true},"
    failed=1
    return
  fi
  echo "== $name (limit ${limit} s): $*"
  local t0 rc; t0=$(date +%s)
  timeout -k 15 "$limit" "$@" >"$out/logs/$name.log" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - t0 ))
  local timed_out=false; { (( rc == 124 )) || (( rc == 137 )); } && timed_out=true
  tail -n 15 "$out/logs/$name.log"
  echo "== $name: exit $rc after ${secs} s$([[ $timed_out == true ]] && echo ' (timed out)')"
  steps_json+="{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"timed_out\": $timed_out},"
  (( rc != 0 )) && failed=1
  return 0
}

# The environment: versions of everything the GPU path imports; fails naming what is missing.
env_check() {
  "$py" - "$out/environment.json" "$1" <<'EOF'
import importlib, json, platform, sys

path, need_cuda = sys.argv[1], sys.argv[2] == "1"
found = {"python": platform.python_version()}
missing = []
for name in ("torch", "transformers", "vllm", "ray", "deepspeed", "pyarrow", "accelerate", "tokenizers",
             "safetensors", "yaml", "pytest", "pytest_timeout"):
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as err:  # a broken install counts as missing, with its reason
        missing.append(f"{name} ({type(err).__name__}: {err})"[:200])
if "torch" in found:
    import torch
    found["cuda_build"] = torch.version.cuda
    found["cuda_available"] = torch.cuda.is_available()
    found["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
json.dump({"found": found, "missing": missing}, open(path, "w"), indent=2)
print(json.dumps(found))
if missing:
    sys.exit("missing or broken: " + "; ".join(missing))
if need_cuda and not found.get("cuda_available"):
    sys.exit("no CUDA device visible: the GPU checks need one (on a CPU machine tests/gpu only skip)")
EOF
}

failed=0
pytest_cmd=("$py" -m pytest -q -p no:cacheprovider tests/gpu)
if (( dry_run )); then
  env_check 0 || exit 2
  echo "dry run: would run, within ${budget} s:"
  echo "  engine_tests (limit ${engine_limit} s): ${pytest_cmd[*]} -m 'not slow' --junitxml $out/engine_tests.xml"
  echo "  ppo_test (limit ${ppo_limit} s): ${pytest_cmd[*]} -m slow --junitxml $out/ppo_test.xml"
  exit 0
fi

if ! env_check "${RLHF_CHECK_NEED_CUDA:-1}" >"$out/logs/environment.log" 2>&1; then
  cat "$out/logs/environment.log"
  echo "device check: the environment is not usable (see $out/environment.json)" >&2
  exit 2
fi
cat "$out/logs/environment.log"
steps_json+="{\"step\": \"environment\", \"rc\": 0, \"seconds\": $(( $(date +%s) - start )), \"timed_out\": false},"

run_step engine_tests "$engine_limit" "${pytest_cmd[@]}" -m "not slow" --junitxml "$out/engine_tests.xml"
run_step ppo_test "$ppo_limit" "${pytest_cmd[@]}" -m slow --junitxml "$out/ppo_test.xml"

total=$(( $(date +%s) - start ))
"$py" - "$out" "[${steps_json%,}]" "$total" "$failed" <<'EOF'
import json, sys
from pathlib import Path

out, steps, total, failed = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
env = json.loads((out / "environment.json").read_text())
report = {"environment": env["found"], "steps": steps, "total_seconds": total, "passed": not failed}
(out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({"steps": steps, "total_seconds": total, "passed": not failed}))
EOF
echo "device check: $([[ $failed == 0 ]] && echo passed || echo FAILED) in ${total} s; results in $out"
exit "$failed"

#!/usr/bin/env bash
# The one-shot GPU check: on one CUDA GPU, in about 10 minutes,
#   1. the test suite (its CUDA tests run only here: they skip on a CPU);
#   2. the default command, python balto.py, timed: wall time, median step and its parts,
#      decode time per token, response tokens per second, and the held-out table it prints;
#   3. TRL's GRPOTrainer on the same work with bf16=True, 8 steps, right after: its median step;
#   4. decoding alone: the eager loop against the static cache and compiled step (bench/sampling.py).
# It needs balto's requirements with torch's CUDA build, the two model wheels, and for part 3 the
# packages trl and datasets (without them part 3 is skipped). From the repository root:
#
#   bash bench/gpu_check.sh [OUT [PARTS]]     # OUT: runs/gpu; PARTS: "1 2 3 4"
set -uo pipefail
out=${1:-runs/gpu}
parts=${2:-1 2 3 4}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=$(command -v python || command -v python3)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python - <<'PY'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda {torch.cuda.is_available()}, {torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
PY

if [[ " $parts " == *" 1 "* ]]; then
echo "== 1. the test suite"
start=$(date +%s)
timeout 200 $python -m pytest -q -p no:cacheprovider -rs > "$out/tests.out" 2>&1
grep -E "passed|failed|SKIPPED|FAILED|Error" "$out/tests.out" | tail -n 12
echo "tests took $(( $(date +%s) - start )) s"
fi

if [[ " $parts " == *" 2 "* ]]; then
echo "== 2. the default command: python balto.py"
start=$(date +%s)
timeout 330 $python balto.py --output-dir "$out/default" > "$out/default.out" 2>&1
echo "exit $?; wall time $(( $(date +%s) - start )) s (loading, compiling, 60 steps, two evaluations)"
grep -E "^(policy|note)" "$out/default.out"
sed -n '/^data_sample (/,/^saved/p' "$out/default.out"
$python bench/steps.py "$out/default"
fi

if [[ " $parts " == *" 3 "* ]]; then
echo "== 3. TRL GRPOTrainer (bf16=True) on the same work, right after"
if $python -c "import trl, datasets" 2>/dev/null; then
  $python -c "
import balto
model, tokenizer = balto.load_policy('smollm2')
model.save_pretrained('$out/smollm2-f32')
tokenizer.save_pretrained('$out/smollm2-f32')" > /dev/null 2>&1
  start=$(date +%s)
  timeout 150 $python bench/trl_grpo.py "$out/smollm2-f32" --bf16 > "$out/trl.out" 2>&1
  echo "exit $?; wall time $(( $(date +%s) - start )) s"
  grep -E "^trl " "$out/trl.out" || tail -n 5 "$out/trl.out"
else
  echo "trl or datasets is not installed: skipped"
fi
fi

if [[ " $parts " == *" 4 "* ]]; then
echo "== 4. decoding a token: the eager loop against the static cache and compiled step"
timeout 150 $python bench/sampling.py 2>&1 | grep -E "ms a token|Error" || echo "bench/sampling.py failed"
fi

#!/usr/bin/env bash
# The language model's gpu preset on one GPU, in at most 8 minutes: 300 steps of the
# 220M-parameter decoder in bf16-mixed (BPE vocabulary 32,768, context 1,024, batch 32),
# then the median tokens/s and MFU of its train lines against the card's bf16 dense peak
# (jaxtrain.throughput.PEAKS). Wheels of grain, ml-collections and tokenizers that the
# machine's image lacks may be carried in wheels/.
#
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G "wheels/*.whl" > /dev/null; then
  pip install -q --no-deps wheels/*.whl
fi
out="${OUT:-runs}/gpu_check"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
timeout 420 python -m experiments.lm --config=experiments/lm.py:gpu --workdir "$out" \
  --config.train.steps=300 --config.optim.warmup_steps=50 --config.train.log_every=50 \
  --config.eval.every_steps=0 --config.ckpt.every_steps=0 --sample_tokens=64
echo "wall: $(( $(date +%s) - start )) s"
python - "$out" <<'PY'
import json, pathlib, statistics, sys
workdir = pathlib.Path(sys.argv[1])
lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
train = [x for x in lines if x["split"] == "train"][1:]  # the first interval holds the warm-up
run = json.loads((workdir / "run.json").read_text())
print("device:", run["environment"]["device_kind"])
print("peak:", run["throughput"]["peak_source"], f'{run["throughput"]["peak_flops"] / 1e12:.0f} TFLOP/s')
print(f'tokens/s: {statistics.median(x["tokens_per_sec"] for x in train):,.0f}')
print(f'MFU: {statistics.median(x["mfu"] for x in train):.1%}  (target 45%)')
print("first chunk (compile included):", run["first_chunk_seconds"], "s")
PY

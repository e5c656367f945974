#!/usr/bin/env bash
# The GPU figures, on one GPU in about 10 minutes, one line per figure:
#   1. the digits quick start, as the README runs it (after its install line);
#   2. the standard library tokenized into shards with a BPE vocabulary of 32,768 (the
#      README's command), then the language model's `gpu` preset on them (220M parameters,
#      bf16-mixed, context 1,024, batch 64, packed documents, loss.chunk=256) for STEPS
#      steps: median tokens/s, MFU against the card's bf16 dense peak
#      (jaxtrain.throughput.PEAKS), data_wait_frac, the compiled chunk's peak memory, the
#      first chunk's time (compiling included), the chunk's compilations;
#   3. variants of 100 steps side by side: attention pallas, the whole logits
#      (loss.chunk=0), pad packing;
#   4. benchmarks/attention.py: each attention implementation's forward and backward at the
#      presets' shapes, with and without segment ids.
# A machine without internet gets the wheels its image lacks (grain, array-record,
# ml-collections, tensorboardX, portpicker) from .whl/, installed into /tmp/site.
#
#     bash benchmarks/gpu_suite.sh            # OUT=folder keeps the runs there
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ! python3 -c "import grain, ml_collections, tensorboardX" 2>/dev/null \
  && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
out="${OUT:-runs}/gpu_suite"
steps="${STEPS:-300}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"

summary() {  # a run's figures from its records: summary WORKDIR LABEL
  python3 - "$1" "$2" <<'PY'
import json, pathlib, statistics, sys
workdir, label = pathlib.Path(sys.argv[1]), sys.argv[2]
if not (workdir / "run.json").exists():
  sys.exit(print(label, "no run.json: see the log above"))
run = json.loads((workdir / "run.json").read_text())
lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
train = [x for x in lines if x["split"] == "train"][1:]  # the first interval holds the warm-up
evals = [x for x in lines if x["split"] == "eval"]
figures = {"status": run["status"], "steps": run.get("final_step")}
if train and "tokens_per_sec" in train[0]:
  figures["tokens_per_sec"] = round(statistics.median(x["tokens_per_sec"] for x in train))
  figures["mfu"] = round(statistics.median(x["mfu"] for x in train), 4)
  figures["step_ms"] = round(1000 / statistics.median(x["steps_per_sec"] for x in train), 2)
if train:
  figures["data_wait_frac"] = round(statistics.median(x["data_wait_frac"] for x in train), 4)
figures["peak_GiB"] = round(run.get("memory", {}).get("peak", 0) / 2**30, 2)
figures["first_chunk_s"] = run.get("first_chunk_seconds")
figures["compilations"] = run.get("train_chunk_compilations")
if evals:
  figures["eval"] = {k: round(v, 4) for k, v in evals[-1].items() if k not in ("step", "split", "time")}
thr = run.get("throughput") or {}
if thr.get("peak_flops"):
  figures["peak_TFLOPs"] = f'{thr["peak_flops"] / 1e12:.0f} ({thr.get("peak_source")})'
print(label, json.dumps(figures))
PY
}

# 1. The quick start (the README's line after `pip install ... -e '.[cuda12]'`).
start=$(date +%s)
timeout 120 python3 -m experiments.digits --workdir "$out/digits" > "$out/digits.log" 2>&1
echo "digits quick start: exit $?, $(( $(date +%s) - start )) s wall"
summary "$out/digits" digits

# 2. The shards, then the gpu preset on them.
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
start=$(date +%s)
timeout 300 python3 -m jaxtrain.data.tokenize --tokenizer="${TOKENIZER:-bpe:32768}" \
  --skip_binary --out="$out/shards" "$stdlib/**/*.py" 2>&1 | tail -1
echo "tokenize: $(( $(date +%s) - start )) s wall"
lm=(python3 -m experiments.lm --config=experiments/lm.py:gpu --config.optim.warmup_steps=50
    --config.eval.every_steps=0 --config.ckpt.every_steps=0 --sample_tokens=64
    --config.data.dir="$out/shards" ${EXTRA:-})  # EXTRA: overrides, for a CPU try
start=$(date +%s)
timeout 300 "${lm[@]}" --config.train.steps="$steps" --config.train.log_every=50 \
  --workdir "$out/lm" > "$out/lm.log" 2>&1
echo "lm gpu preset: exit $?, $(( $(date +%s) - start )) s wall"
tail -3 "$out/lm.log"
summary "$out/lm" "lm gpu preset"

# 3. Variants of 100 steps: VARIANTS holds `name=overrides` entries separated by `;`.
IFS=';' read -ra variants <<< "${VARIANTS:-attention pallas=--config.model.attention=pallas;whole logits=--config.loss.chunk=0;pad packing=--config.data.packing=pad}"
for variant in "${variants[@]}"; do
  name="${variant%%=*}"; read -ra extra <<< "${variant#*=}"
  dir="$out/variant_${name// /_}"
  timeout 150 "${lm[@]}" --config.train.steps=100 --config.train.log_every=10 "${extra[@]}" \
    --workdir "$dir" > "$dir.log" 2>&1 \
    || { echo "$name: failed"; tail -3 "$dir.log"; }
  summary "$dir" "$name"
done

# 4. The attention kernels alone.
timeout 240 python3 benchmarks/attention.py ${ATTENTION_FLAGS:-} 2>&1 | grep -v "^[IW][0-9]"

#!/usr/bin/env bash
# The pipeline on every GPU of one node: cache-teacher with one worker per GPU,
# a resume that verifies and skips, the GPU cache compared with a CPU one of
# the same rows, then `vpmoe train` on N NCCL ranks and a resume past its last
# checkpoint. Uses the teacher, student and data of a quickstart run:
#   vpmoe quickstart QS --size ci          # on any machine (CPU)
#   scripts/multi_gpu_check.sh QS WORK     # on the GPU node
set -euo pipefail
qs=$(realpath "$1"); work=$(realpath -m "${2:-/tmp/vpmoe-multi-gpu}")
py=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu: the same steps on 2 gloo ranks, one cache worker (a dry run of this script)
if [ "$device" = cuda ]; then
  nvidia-smi -L; ngpu=$(nvidia-smi -L | wc -l); workers=(--gpus "$(seq -s, 0 $((ngpu - 1)))")
else
  ngpu=2; workers=()
fi
rm -rf "$work"; mkdir -p "$work"
cache() {  # split, extra args
  local split=$1; shift
  $py -m cli cache-teacher --model "$qs/teacher" --data "$qs/data" --split "$split" --out "$work/cache/$split" \
    --backend hf --device "$device" "${workers[@]}" --top-k 16 --temperatures 1,2 --hidden-layers 2 \
    --hidden-dtype bf16 "$@"
}
echo "== cache-teacher: ${workers[*]:-one worker} on $device"
cache train --rows-per-shard 32
cache validation --rows-per-shard 8
echo "== rerun: finished shards are verified and skipped"
cache train --rows-per-shard 32
$py -m cli inspect-shard "$work/cache/train" --verify | tail -n 4
echo "== GPU cache against the CPU cache of the same rows"
$py bench/compare_caches.py "$qs/cache/train" "$work/cache/train" --json "$work/compare.json"
train() {  # steps, extra args
  local steps=$1; shift
  $py -m cli train "$qs/train.yaml" --nproc-per-node "$ngpu" "$@" --set device="$device" \
    student.path="$qs/student-init" data.train_cache="$work/cache/train" data.eval_cache="$work/cache/validation" \
    data.pin_memory="$([ "$device" = cuda ] && echo true || echo false)" checkpoint.dir="$work/run/checkpoints" export.dir="$work/run/export" \
    log.jsonl="$work/run/log.jsonl" optim.steps="$steps"
}
echo "== train on $ngpu ranks ($device)"
train 30
echo "== resume to step 40"
train 40 --resume
$py - "$work/run/log.jsonl" <<'PY'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
evals = [r for r in recs if r["kind"] == "eval"]
steps = [r["step"] for r in recs if r["kind"] == "train"]
print(f"{len(steps)} train records, steps {steps[0]}..{steps[-1]}; evals at", [r["step"] for r in evals])
print(f"eval CE {evals[0]['ce']:.3f} -> {evals[-1]['ce']:.3f}, KL {evals[0]['kl']:.4f} -> {evals[-1]['kl']:.4f}")
print("summaries", [json.dumps(r) for r in recs if r["kind"] == "summary"])
PY
ls "$work/run/checkpoints" "$work/run/export"

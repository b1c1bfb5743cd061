#!/usr/bin/env bash
# Quickstart on a CPU machine: install, then pretrain a ~3 M-parameter Llama-style GPT with the
# distributed Scion optimizer on TP=2 x PP=2 (x DP=1) gloo processes, on the embedded corpus
# (Python's own standard library, tokenized by a sentencepiece model trained at first use).
# Writes runs/quickstart/{checkpoints,tensorboard,train_log.jsonl,norms.jsonl,run_config.json}.
# Usage: bash examples/quickstart.sh [extra disco-pretrain flags, e.g. --train-iters 50]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e .
RUN_DIR=${RUN_DIR:-runs/quickstart}
NPROC=${NPROC:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29511}" \
  -m disco_megatron.train \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --num-layers 4 --hidden-size 192 --num-attention-heads 4 --num-query-groups 2 --ffn-hidden-size 512 \
  --seq-length 128 --vocab-size 4096 \
  --micro-batch-size 4 --global-batch-size 16 --train-iters 120 \
  --optimizer scion --lr 0.02 \
  --lr-decay-style cosine --lr-warmup-iters 10 --min-lr 0.002 \
  --log-interval 10 --eval-interval 60 --eval-iters 4 --norm-log-interval 10 --save-interval 60 \
  --run-dir "$RUN_DIR" "$@"
echo "quickstart: done. TensorBoard: tensorboard --logdir $RUN_DIR/tensorboard ; norms: $RUN_DIR/norms.jsonl"

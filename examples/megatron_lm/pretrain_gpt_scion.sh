#!/usr/bin/env bash
# Megatron-LM's own pretrain_gpt.py trained with disco_megatron's distributed Scion, on one node.
#
#   MEGATRON_LM=/path/to/Megatron-LM examples/megatron_lm/pretrain_gpt_scion.sh [more Megatron-LM flags]
#
# Against a plain Megatron-LM launch, three things change (Megatron-LM itself is not edited):
#   1. torchrun ... -m disco_megatron.integrations.megatron_lm "$MEGATRON_LM/pretrain_gpt.py" ...
#      instead of torchrun ... "$MEGATRON_LM/pretrain_gpt.py" ...
#   2. --optimizer scion, with any --scion-* flag (lr and radius per layer group, momentum, modes)
#   3. --norm-log-interval N: norm statistics to TENSORBOARD_DIR/norms.jsonl and TensorBoard
# (Instead of 1. one may add two lines at the top of pretrain_gpt.py's __main__ block:
#      import disco_megatron.integrations.megatron_lm as disco
#      disco.install()
#  and launch pretrain_gpt.py as usual.)
#
# Environment:
#   MEGATRON_LM      Megatron-LM checkout at core_r0.16 (matches megatron-core 0.16.1); required
#   DATA_PATH        indexed dataset prefix (.bin/.idx); default: Megatron-LM's --mock-data
#   TOKENIZER_MODEL  sentencepiece model of DATA_PATH (required with DATA_PATH)
#   NPROC_PER_NODE   GPUs to use (default 8)
#   RUN_DIR          checkpoints, TensorBoard and norms.jsonl (default runs/megatron_lm_scion)
#   FP8=1            TransformerEngine FP8 (--fp8-format hybrid --fp8-recipe tensorwise)
#   DRY_RUN=1        print the command instead of running it
set -euo pipefail

die() {
    echo "pretrain_gpt_scion.sh: $*" >&2
    exit 2
}

[[ -n "${MEGATRON_LM:-}" ]] || die "set MEGATRON_LM to a Megatron-LM checkout (core_r0.16)"
[[ -f "$MEGATRON_LM/pretrain_gpt.py" ]] || die "MEGATRON_LM=$MEGATRON_LM has no pretrain_gpt.py"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
RUN_DIR="${RUN_DIR:-runs/megatron_lm_scion}"

MODEL=(
    --num-layers 12 --hidden-size 768 --num-attention-heads 12 --num-query-groups 4 --group-query-attention
    --ffn-hidden-size 2048 --swiglu --normalization RMSNorm --position-embedding-type rope
    --disable-bias-linear --untie-embeddings-and-output-weights
    --seq-length 1024 --max-position-embeddings 1024
    --transformer-impl transformer_engine --bf16
)
TRAINING=(
    --micro-batch-size 4 --global-batch-size 256 --train-iters 2000
    --lr 0.02 --min-lr 0.002 --lr-decay-style cosine --lr-warmup-iters 100
    --log-interval 10 --eval-interval 500 --eval-iters 10
    --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval 500
    --tensorboard-dir "$RUN_DIR/tensorboard"
)
SCION=(
    --optimizer scion
    --scion-lr-embedding 0.02 --scion-lr-hidden 0.02 --scion-lr-output 0.005
    --scion-radius-embedding 1.0 --scion-radius-hidden 3.0 --scion-radius-output 10.0
    --scion-momentum 0.1 --scion-qkv-split qkv --scion-tp-mode owner --scion-dp-mode replicated
    --norm-log-interval 10
)
if [[ -n "${DATA_PATH:-}" ]]; then
    [[ -n "${TOKENIZER_MODEL:-}" ]] || die "DATA_PATH needs TOKENIZER_MODEL (the sentencepiece model it was tokenized with)"
    DATA=(--data-path "$DATA_PATH" --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
else
    DATA=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000)
fi
FP8_FLAGS=()
if [[ "${FP8:-0}" == 1 ]]; then
    FP8_FLAGS=(--fp8-format hybrid --fp8-recipe tensorwise)
fi

CMD=(torchrun --nproc-per-node "$NPROC_PER_NODE"
    -m disco_megatron.integrations.megatron_lm "$MEGATRON_LM/pretrain_gpt.py"
    "${MODEL[@]}" "${TRAINING[@]}" "${SCION[@]}" "${DATA[@]}" "${FP8_FLAGS[@]}" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
export PYTHONPATH="$MEGATRON_LM${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec "${CMD[@]}"

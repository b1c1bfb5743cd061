#!/usr/bin/env bash
# Check this project on a GPU machine (1-8 NVIDIA GPUs) in one command, in under 8 minutes:
#   installs what is missing (transformer-engine[pytorch]), then runs tests/gpu_checks.py:
#   (a) NCCL parity of owner, duplicated and DP-sharded Scion vs the single-process reference
#       at TP = number of GPUs, at the bf16 Newton-Schulz tolerance (docs/newton_schulz_precision.md);
#   (b) 30 disco-pretrain steps with --transformer-impl transformer_engine --bf16 --fp8-format hybrid:
#       loss falls, FP8 active per TE's layer state, fp32 masters moved, weights equal their masters;
#   (c) throughput of a ~125M model (DP = the GPUs, --overlap-grad-reduce, TE bf16), Scion vs megatron-core
#       Adam: tokens/s, MFU, optimizer step time;
#   (d) all results in one JSON under benchmarks/results/gpu/.
# Each check has a CPU twin in tests/test_gpu_checks.py.
#
# Usage: bash tests/run_gpu.sh [--dry-run] [--nproc N] [--steps N] [--out FILE] [--no-install]
#   --dry-run     print the plan and exit (works without a GPU)
#   --nproc N     GPUs to use, 1-8 (default: every GPU nvidia-smi lists)
#   --steps N     throughput steps per optimizer (default 20)
#   --out FILE    results JSON (default benchmarks/results/gpu/gpu_checks_<UTC time>.json)
#   --no-install  do not pip-install transformer-engine[pytorch] when it is missing
set -euo pipefail
cd "$(dirname "$0")/.."

TIME_LIMIT_S=480
TE_PACKAGE='transformer-engine[pytorch]'

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "tests/run_gpu.sh: error: $*" >&2; exit 2; }

dry_run=0
install=1
nproc=""
steps=20
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --no-install) install=0 ;;
    --nproc|--steps|--out)
      [ $# -ge 2 ] || die "$1 needs a value (see --help)"
      case "$1" in
        --nproc) nproc="$2" ;;
        --steps) steps="$2" ;;
        --out) out="$2" ;;
      esac
      shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'; see bash tests/run_gpu.sh --help" ;;
  esac
  shift
done

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
fi
note=""
if [ -z "$nproc" ]; then
  nproc=$gpus
  if [ "$nproc" -eq 0 ]; then
    nproc=1
    note=" (no NVIDIA GPU found: plan shown for --nproc 1)"
  elif [ "$nproc" -gt 8 ]; then
    nproc=8
  fi
fi
case "$nproc" in
  ''|*[!0-9]*) die "--nproc '$nproc': give a whole number of GPUs, 1 to 8" ;;
esac
[ "$nproc" -ge 1 ] && [ "$nproc" -le 8 ] || die "--nproc $nproc: give 1 to 8 GPUs"
case "$steps" in
  ''|*[!0-9]*|0) die "--steps '$steps': give a whole number of steps >= 1" ;;
esac
[ -n "$out" ] || out="benchmarks/results/gpu/gpu_checks_$(date -u +%Y%m%dT%H%M%SZ).json"

checks=(python tests/gpu_checks.py all --device cuda --nproc "$nproc" --steps "$steps" --out "$out")
echo "tests/run_gpu.sh plan: $nproc GPU(s)$note"
if [ "$install" -eq 1 ]; then
  echo "  1. install, if 'import transformer_engine.pytorch' fails: python -m pip install --no-build-isolation '$TE_PACKAGE'"
else
  echo "  1. install: skipped (--no-install)"
fi
echo "  2. (a) parity at TP $nproc, (b) 30 FP8 training steps at TP $nproc, (c) throughput Scion vs Adam at DP $nproc with --overlap-grad-reduce ($steps steps each)"
echo "     timeout ${TIME_LIMIT_S}s ${checks[*]}"
echo "  3. (d) results: $out"
if [ "$dry_run" -eq 1 ]; then
  exit 0
fi

[ "$gpus" -ge 1 ] || die "no NVIDIA GPU found (nvidia-smi lists none); run on a GPU machine or pass --dry-run"
[ "$nproc" -le "$gpus" ] || die "--nproc $nproc: this machine has $gpus GPU(s); lower --nproc"
if [ "$install" -eq 1 ] && ! python -c 'import transformer_engine.pytorch' >/dev/null 2>&1; then
  python -m pip install --quiet --no-build-isolation "$TE_PACKAGE"
fi
mkdir -p "$(dirname "$out")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout "$TIME_LIMIT_S" "${checks[@]}"

"""The checks ``tests/run_gpu.sh`` runs on a GPU machine, each with a CPU twin (same code, gloo, fp32).

``python tests/gpu_checks.py {parity,train,throughput,all} --device {cuda,cpu} --nproc N --out FILE``

- ``parity``: distributed Scion (owner and duplicated at TP = N; DP-sharded at TP = N/2 x DP 2, or
  TP1 on one process) against the single-process reference, two steps; the tolerance is the one
  the Newton–Schulz precision allows (docs/newton_schulz_precision.md: 5e-2 with bf16 NS, the CUDA
  default; 1e-4 with fp32, the CPU default).
- ``train``: 30 ``disco-pretrain`` steps at TP = N, in-process; on CUDA with
  ``--transformer-impl transformer_engine --bf16 --fp8-format hybrid``. Asserts: the loss falls,
  FP8 is active according to TE's own state on the layers (CUDA), the fp32 masters moved, and the
  model weights equal their masters rounded to the weights' format.
- ``throughput``: a ~125M-parameter model (12 layers, h768, 12 heads, ffn 3072; on CPU a tiny one),
  data-parallel over the N devices with ``--overlap-grad-reduce`` (and, on CUDA, TransformerEngine's
  fused layers in bf16), Scion against megatron-core Adam: tokens/s, MFU (CUDA, from the GPU's dense
  bf16 peak) and the optimizer step time.

The CPU twins run in ``tests/test_gpu_checks.py``; the CUDA runs have only been written, not run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from _dist import megatron_groups, run_workers  # noqa: E402
from _scion_model import ShardedRun, reference_run  # noqa: E402
from disco_megatron.scion_options import DEFAULTS, ns_dtype_for  # noqa: E402

# Relative error of each parameter's change vs the reference, by Newton–Schulz precision.
PARITY_TOLERANCE = {"bf16": 5e-2, "fp32": 1e-4}
PARITY_STEPS = 2
TRAIN_STEPS = 30
# Dense bf16 peak FLOP/s per GPU (vendor datasheets), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
TRAIN_MODEL = {"cuda": ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
                        "--num-query-groups", "4", "--ffn-hidden-size", "1024", "--seq-length", "128"],
               "cpu": ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                       "--num-query-groups", "2", "--ffn-hidden-size", "128", "--seq-length", "16"]}
TRAIN_PRECISION = {"cuda": ["--transformer-impl", "transformer_engine", "--bf16", "--fp8-format", "hybrid"],
                   "cpu": []}
THROUGHPUT_MODEL = {"cuda": ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
                             "--ffn-hidden-size", "3072", "--seq-length", "1024", "--micro-batch-size", "8",
                             "--transformer-impl", "transformer_engine", "--bf16"],
                    "cpu": TRAIN_MODEL["cpu"] + ["--micro-batch-size", "2"]}
# The throughput runs data-parallel over the N devices (TP1, one microbatch per rank per step) with the
# gradient all-reduce overlapped with the backward pass, as Megatron-LM users run a 125M model.
THROUGHPUT_PARALLEL = ["--tensor-model-parallel-size", "1", "--overlap-grad-reduce"]


def _use_device(rank: int, device: str) -> torch.device:
    """This rank's device; on CUDA the gloo group run_workers made is replaced by an NCCL one."""
    if device != "cuda":
        return torch.device("cpu")
    import torch.distributed as dist

    from disco_megatron.runtime.parallel import destroy_parallel, init_process_group

    destroy_parallel()
    torch.cuda.set_device(rank)
    init_process_group(backend="nccl")
    return torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def _parity_worker(rank: int, world: int, device: str, out: str) -> None:
    dev = _use_device(rank, device)
    ns_dtype = ns_dtype_for(None, dev.type)
    errors = {}
    layouts = {"owner": (world, 1), "duplicated": (world, 1),
               "sharded": (world // 2, 2) if world % 2 == 0 else (world, 1)}
    for mode, (tp, dp) in layouts.items():
        flags = dataclasses.replace(DEFAULTS, ns_dtype=ns_dtype, tp_mode="owner" if mode == "sharded" else mode,
                                    dp_mode="sharded" if mode == "sharded" else "replicated")
        groups, (tp_rank, _, _) = megatron_groups(tp, 1, dp)
        run = ShardedRun(groups, tp, tp_rank, 1, 0, flags, device=dev)
        history = reference_run(flags, PARITY_STEPS)
        for step in range(PARITY_STEPS):
            assert run.step(step).stepped
        errors[mode] = max(run.change_errors(history[0], history[-1]).values())
    if rank == 0:
        Path(out).write_text(json.dumps({"ns_dtype": ns_dtype, "tolerance": PARITY_TOLERANCE[ns_dtype],
                                         "max_relative_error": errors}))


def check_parity(device: str, nproc: int) -> dict[str, Any]:
    """Owner, duplicated and DP-sharded Scion vs the reference; raises if over the tolerance."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "parity.json")
        run_workers(_parity_worker, nproc, device, out)
        result = json.loads(Path(out).read_text())
    bad = {m: e for m, e in result["max_relative_error"].items() if not e <= result["tolerance"]}
    if bad:
        raise AssertionError(f"parity: relative errors {bad} above {result['tolerance']} (NS {result['ns_dtype']})")
    return result


def _capture_optimizer(record: dict[str, Any]) -> None:
    """Keep the run's optimizer and model chunks (and the masters' start values) in ``record``, and time
    every optimizer step (synchronised on CUDA)."""
    from disco_megatron import builders

    build = builders.build_optimizer

    def build_and_keep(cfg, chunks):
        optimizer = build(cfg, chunks)
        record["chunks"], record["optimizer"], record["step_s"] = chunks, optimizer, []
        record["start"] = [m.detach().clone() for m in getattr(optimizer, "main_params", [])]
        step = optimizer.step

        def timed_step(*args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            begin = time.perf_counter()
            result = step(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record["step_s"].append(time.perf_counter() - begin)
            return result

        optimizer.step = timed_step
        return optimizer

    builders.build_optimizer = build_and_keep


def _run_pretrain(flags: list[str]) -> dict[str, Any]:
    from disco_megatron.train import main

    record: dict[str, Any] = {}
    _capture_optimizer(record)
    record["code"] = main(flags)
    return record


def _data_flags(data: tuple[str, str]) -> list[str]:
    return ["--data-path", data[0], "--tokenizer-model", data[1]]


def _train_worker(rank: int, world: int, device: str, run_dir: str, data: tuple[str, str], out: str) -> None:
    dev = _use_device(rank, device)
    flags = [*TRAIN_MODEL[dev.type], *TRAIN_PRECISION[dev.type], "--tensor-model-parallel-size", str(world),
             "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", str(TRAIN_STEPS),
             "--log-interval", "1", "--optimizer", "scion", "--lr", "0.02", "--run-dir", run_dir, *_data_flags(data)]
    record = _run_pretrain(flags)
    try:
        result = _inspect_training(record)
    finally:
        record.clear()  # the model and optimizer hold process groups, which must die with the run
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def _inspect_training(record: dict[str, Any]) -> dict[str, Any]:
    """Masters moved, weights equal their rounded masters, TE layers running FP8 (TE's own flag)."""
    from disco_megatron.models.fp8 import is_quantized

    assert record["code"] == 0, f"disco-pretrain exited {record['code']}"
    optimizer = record["optimizer"]
    moved = [not torch.equal(s, m) for s, m in zip(record["start"], optimizer.main_params)]
    mismatched = []
    for param, main in zip(optimizer.model_params, optimizer.main_params):
        if main is param:
            continue
        weight = param.dequantize() if is_quantized(param) else param
        expected = main.to(param.dtype) if not is_quantized(param) else None
        if expected is not None and not torch.equal(weight, expected):
            mismatched.append(tuple(param.shape))
        elif expected is None and not (weight.float() - main).norm() <= 2.0 ** -3 * main.norm():
            mismatched.append(tuple(param.shape))  # FP8 weight: within e4m3's relative spacing 2^-4 per entry
    te_layers = [m for chunk in record["chunks"] for m in chunk.modules() if hasattr(m, "fp8_meta")]
    return {"masters_moved": sum(moved), "masters": len(moved), "weights_off_master": mismatched,
            "te_layers": len(te_layers), "te_fp8_layers": sum(bool(getattr(m, "fp8", False)) for m in te_layers)}


def check_train(device: str, nproc: int, data: tuple[str, str]) -> dict[str, Any]:
    """30 disco-pretrain steps (FP8 on CUDA); raises unless every assertion of the module docstring holds."""
    from disco_megatron.launcher import read_train_log

    with tempfile.TemporaryDirectory() as tmp:
        out, run_dir = os.path.join(tmp, "train.json"), os.path.join(tmp, "run")
        run_workers(_train_worker, nproc, device, run_dir, data, out)
        result = json.loads(Path(out).read_text())
        losses = [r["loss"] for r in read_train_log(run_dir) if r.get("loss") is not None]
    result["first_loss"], result["last_loss"] = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
    problems = []
    if not result["last_loss"] < result["first_loss"] - 0.3:
        problems.append(f"loss did not fall ({result['first_loss']:.3f} -> {result['last_loss']:.3f})")
    if result["masters_moved"] != result["masters"]:
        problems.append(f"only {result['masters_moved']} of {result['masters']} fp32 masters moved")
    if result["weights_off_master"]:
        problems.append(f"model weights differ from their quantised masters: {result['weights_off_master']}")
    if device == "cuda" and not (result["te_layers"] and result["te_fp8_layers"] == result["te_layers"]):
        problems.append(f"FP8 inactive: {result['te_fp8_layers']} of {result['te_layers']} TE layers report fp8")
    if problems:
        raise AssertionError("train: " + "; ".join(problems))
    return result


def _throughput_worker(rank: int, world: int, device: str, optimizer: str, steps: int, run_dir: str,
                       data: tuple[str, str], out: str) -> None:
    dev = _use_device(rank, device)
    lr = "0.02" if optimizer == "scion" else "3e-4"
    micro_batch = int(THROUGHPUT_MODEL[dev.type][THROUGHPUT_MODEL[dev.type].index("--micro-batch-size") + 1])
    flags = [*THROUGHPUT_MODEL[dev.type], *THROUGHPUT_PARALLEL, "--global-batch-size", str(micro_batch * world),
             "--train-iters", str(steps), "--log-interval", "1", "--norm-log-interval", str(10 * steps),
             "--optimizer", optimizer, "--lr", lr, "--run-dir", run_dir, *_data_flags(data)]
    record = _run_pretrain(flags)
    assert record["code"] == 0, f"disco-pretrain exited {record['code']}"
    result = {"step_s": record["step_s"],
              "params_rank0": sum(p.numel() for chunk in record["chunks"] for p in chunk.parameters())}
    record.clear()  # the model and optimizer hold process groups, which must die with the run
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def check_throughput(device: str, nproc: int, data: tuple[str, str], steps: int) -> list[dict[str, Any]]:
    """Scion vs Adam rows: tokens/s (median over the steps after the first two), MFU, optimizer step time."""
    from disco_megatron.launcher import read_train_log

    rows = []
    for optimizer in ("scion", "adam"):
        with tempfile.TemporaryDirectory() as tmp:
            out, run_dir = os.path.join(tmp, "tp.json"), os.path.join(tmp, "run")
            run_workers(_throughput_worker, nproc, device, optimizer, steps, run_dir, data, out)
            result = json.loads(Path(out).read_text())
            log = [r for r in read_train_log(run_dir) if "tokens_per_s" in r][2:]
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in log)
        params = result["params_rank0"]  # TP1: rank 0 holds the whole model
        peak = next((f for name, f in PEAK_BF16_FLOPS.items() if device == "cuda"
                     and name in torch.cuda.get_device_name(0)), None)
        rows.append({"optimizer": optimizer, "params": params, "tokens_per_s": tokens_per_s,
                     "mfu": 6 * params * tokens_per_s / (peak * nproc) if peak else None,
                     "optimizer_step_ms": 1000 * statistics.median(result["step_s"][2:] or result["step_s"])})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("parity", "train", "throughput", "all"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--nproc", type=int, default=1, help="processes (one per GPU on CUDA), 1-8")
    parser.add_argument("--steps", type=int, default=20, help="throughput steps per optimizer")
    parser.add_argument("--out", default=None, help="JSON file of the results")
    args = parser.parse_args(argv)
    if not 1 <= args.nproc <= 8:
        parser.error(f"--nproc {args.nproc}: give 1 to 8 processes")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        parser.error(f"--nproc {args.nproc}: only {torch.cuda.device_count()} CUDA devices; lower --nproc")
    from disco_megatron.data import build_embedded_dataset

    data = build_embedded_dataset(os.environ.get("DISCO_CACHE_DIR"), 4096)
    results: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                               "device": args.device, "nproc": args.nproc, "torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    if args.check in ("parity", "all"):
        results["parity"] = check_parity(args.device, args.nproc)
        print("parity:", json.dumps(results["parity"]), flush=True)
    if args.check in ("train", "all"):
        results["train"] = check_train(args.device, args.nproc, data)
        print("train:", json.dumps(results["train"]), flush=True)
    if args.check in ("throughput", "all"):
        results["throughput"] = check_throughput(args.device, args.nproc, data, args.steps)
        print(f"{'optimizer':>9} {'params':>12} {'tokens/s':>12} {'MFU':>6} {'opt step ms':>12}")
        for row in results["throughput"]:
            mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
            print(f"{row['optimizer']:>9} {row['params']:>12,} {row['tokens_per_s']:>12.0f} {mfu:>6} "
                  f"{row['optimizer_step_ms']:>12.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

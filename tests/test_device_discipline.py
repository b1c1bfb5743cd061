"""Every buffer and collective of the Scion step (owner, duplicated, DP-sharded), the norm logging and the training step is on the
parameters' device (TP2 on 2 gloo processes, under the recording mode of ``tests/_device_audit.py``).

On CPU a host buffer works; under NCCL it fails. The audit fails on factories without ``device=`` in
``optim/``, ``norms/`` and ``training/`` and on collectives given host-created tensors, and it counts
the host reads of the optimizer step (docs/device_discipline.md: one per step).
"""
from __future__ import annotations

import torch

from _dist import megatron_groups, run_workers
from _device_audit import DeviceAudit
from _scion_model import ShardedRun

from disco_megatron.norms.sharded import PowerIterationState, sharded_norms_many
from disco_megatron.runtime.cpu_shims import install_cpu_shims
from disco_megatron.scion_options import ScionFlags

CPU = torch.device("cpu")
# The Scion step's one device->host copy: the grad check's three statistics, read at once.
STEP_HOST_READS = {"disco_megatron/optim/distributed.py": 1}


def _optimizer_and_norms_worker(rank: int, world: int, out: str) -> None:
    install_cpu_shims()  # its mode must sit below the audit's on the mode stack
    with DeviceAudit(CPU) as audit:
        groups, (tp_rank, _, _) = megatron_groups(2, 1)
        runs = [ShardedRun(groups, 2, tp_rank, 1, 0, ScionFlags(tp_mode=mode, dp_mode="replicated"))
                for mode in ("owner", "duplicated")]
        dp_groups, _ = megatron_groups(1, 1)  # the same two processes as TP1 x DP2: the sharded exchange
        runs.append(ShardedRun(dp_groups, 1, 0, 1, 0, ScionFlags(tp_mode="owner", dp_mode="sharded")))
        step_reads = []
        for run in runs:
            run.set_grads(0)
            audit.host_reads.clear()
            assert run.opt.step().stepped
            step_reads.append(dict(audit.host_reads))
        run = runs[0]
        items = [(name, p.detach(), run.layouts[p].partition_dim) for name, p in run.params.items()]
        # Lanczos (cold start, then warm start from the stored vectors) and the exact-SVD path.
        for state in (PowerIterationState(exact_max_dim=0, max_iters=8), PowerIterationState()):
            for _ in range(2):
                sharded_norms_many(items, groups.tp, state=state, with_condition=True)
    torch.save({"violations": audit.violations, "step_reads": step_reads}, f"{out}.{rank}")


def _pretrain_worker(rank: int, world: int, out: str, run_dir: str, data: tuple[str, str]) -> None:
    from disco_megatron.train import main

    install_cpu_shims()
    prefix, tokenizer = data
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
             "--ffn-hidden-size", "128", "--seq-length", "16", "--tensor-model-parallel-size", "2",
             "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--log-interval", "1",
             "--norm-log-interval", "1", "--optimizer", "scion", "--lr", "0.02", "--run-dir", run_dir,
             "--data-path", prefix, "--tokenizer-model", tokenizer]
    with DeviceAudit(CPU) as audit:
        code = main(flags)
    torch.save({"violations": audit.violations, "code": code}, f"{out}.{rank}")


def _results(out: str) -> list[dict]:
    return [torch.load(f"{out}.{rank}") for rank in range(2)]


def test_scion_step_and_norm_logging_stay_on_the_parameters_device(tmp_path) -> None:
    out = str(tmp_path / "audit")
    run_workers(_optimizer_and_norms_worker, 2, out)
    for result in _results(out):
        assert not result["violations"], "\n".join(sorted(set(result["violations"])))
        for reads in result["step_reads"]:
            by_file: dict[str, int] = {}
            for site, count in reads.items():
                by_file[site.split(":")[0]] = by_file.get(site.split(":")[0], 0) + count
            assert by_file == STEP_HOST_READS, reads


def test_disco_pretrain_step_stays_on_the_parameters_device(tmp_path, embedded_data) -> None:
    out = str(tmp_path / "audit")
    run_workers(_pretrain_worker, 2, out, str(tmp_path / "run"), embedded_data)
    for result in _results(out):
        assert result["code"] == 0
        assert not result["violations"], "\n".join(sorted(set(result["violations"])))

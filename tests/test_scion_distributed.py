"""Distributed Scion on megatron-named GQA+SwiGLU shards vs the reference Scion on full tensors.

Layouts of the same world size share one set of gloo processes (groups in megatron's rank
order, built without importing megatron, so a test costs seconds).
Every rank builds the full TP1 model and gradients from fixed seeds, shards them as megatron
would, steps the distributed optimizer, and checks its shards against the reference run on
the full tensors (relative error of the parameter *change*, so a wrong direction cannot hide
behind large weights). Byte counts and measured numbers come back as JSON.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from _dist import megatron_groups, run_workers
from disco_megatron.models.naming import tp_partition_dim
from disco_megatron.models.sharding import local_param_name, shard_full_tensor
from disco_megatron.optim.distributed import DistributedScion, StageGroups
from disco_megatron.optim.layout import build_layout, needs_whole, reference_row_splits
from disco_megatron.optim.scion import Scion

CFG = SimpleNamespace(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_channels=8,
                      ffn_hidden_size=96, gated_linear_unit=True, num_layers=2, vocab_size=128)
LR = {"embedding": 0.05, "hidden": 0.02, "output": 0.03, "gains": 0.01}
RADIUS = {"embedding": 2.0, "hidden": 1.0, "output": 3.0, "gains": 0.5}
HYPER = dict(momentum=0.3, constrained=True, weight_decay=0.05)
TOL = 1e-5


def full_shapes(cfg: SimpleNamespace = CFG) -> dict[str, tuple[int, ...]]:
    """TP1/PP1 megatron parameter names and shapes (local spec, biases on QKV and fc1)."""
    h, kv, f = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * kv
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (cfg.vocab_size, h)}
    for layer in range(cfg.num_layers):
        p = f"decoder.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attention.linear_qkv.weight": (qkv_rows, h),
            p + "self_attention.linear_qkv.bias": (qkv_rows,),
            p + "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * kv),
            p + "pre_mlp_layernorm.weight": (h,),
            p + "mlp.linear_fc1.weight": (2 * f, h),
            p + "mlp.linear_fc1.bias": (2 * f,),
            p + "mlp.linear_fc2.weight": (h, f),
        }
    return shapes | {"decoder.final_layernorm.weight": (h,), "output_layer.weight": (cfg.vocab_size, h)}


def full_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in full_shapes().items()}


def stage_names(pp_rank: int, pp: int) -> dict[str, str]:
    """Global name -> stage-local name of the parameters on pipeline stage ``pp_rank``."""
    out = {}
    for name in full_shapes():
        stage, local = local_param_name(name, CFG.num_layers, pp)
        if stage is None:
            stage = 0 if name.startswith("embedding.") else pp - 1
        if stage == pp_rank:
            out[name] = local
    return out


def reference_run(steps: int, qkv_split: str, backend: str) -> list[dict[str, torch.Tensor]]:
    """Full-model reference Scion: the parameters after each step (index 0: initial)."""
    params = {n: t.clone() for n, t in full_tensors(0).items()}
    groups: dict[tuple[str, str], list[torch.Tensor]] = {}
    row_splits = {}
    for name, p in params.items():
        layout = build_layout(name, p.shape, CFG, qkv_split=qkv_split)
        groups.setdefault((layout.lr_group, layout.lmo), []).append(p)
        splits = reference_row_splits(layout)
        if splits is not None:
            row_splits[p] = splits
    opt = Scion([{"params": ps, "lr": LR[g], "radius": RADIUS[g], "lmo": lmo}
                 for (g, lmo), ps in groups.items()],
                row_splits=row_splits, ns_backend=backend, **HYPER)
    history = [{n: p.clone() for n, p in params.items()}]
    for step in range(steps):
        grads = full_tensors(100 + step)
        for name, p in params.items():
            p.grad = grads[name]
        opt.step()
        history.append({n: p.clone() for n, p in params.items()})
    return history


class ShardedRun:
    """This rank's shards of the model, stepped by DistributedScion."""

    def __init__(self, groups: StageGroups, tp: int, tp_rank: int, pp: int, pp_rank: int,
                 **opt_kwargs: object) -> None:
        self.tp, self.tp_rank = tp, tp_rank
        self.names = stage_names(pp_rank, pp)
        qkv_split = opt_kwargs.pop("qkv_split", "fused")
        full = full_tensors(0)
        self.params = {g: self.shard(g, full[g]) for g in self.names}
        self.layouts = {self.params[g]: build_layout(local, self.params[g].shape, CFG, tp_size=tp,
                                                     tp_rank=tp_rank, qkv_split=qkv_split)
                        for g, local in self.names.items()}
        by_group: dict[str, list[torch.Tensor]] = {}
        for p, layout in self.layouts.items():
            by_group.setdefault(layout.lr_group, []).append(p)
        self.opt = DistributedScion(
            [{"params": ps, "lr": LR[g], "radius": RADIUS[g]} for g, ps in by_group.items()],
            self.layouts, groups, **HYPER, **opt_kwargs)

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return shard_full_tensor(name, full, self.tp_rank, self.tp, tp_partition_dim(name), True)

    def step(self, step: int) -> None:
        grads = full_tensors(100 + step)
        for g, p in self.params.items():
            p.grad = self.shard(g, grads[g])
        self.opt.step()

    def change_errors(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                      start: dict[str, torch.Tensor]) -> dict[str, float]:
        """Relative error of this rank's parameter change vs the reference change, per name."""
        errors = {}
        for g, p in self.params.items():
            want = self.shard(g, after[g] - before[g])
            got = p - self.shard(g, start[g])
            errors[g] = float((got - want).norm() / want.norm())
        return errors

    def gathered_bytes(self) -> int:
        """Full bytes of the logical matrices that need communication (this stage)."""
        return sum(4 * math.prod(m.shape) for layout in self.layouts.values()
                   for m in layout.matrices if needs_whole(m, layout.lmo))


def _gather_floats(values: list[float], group: dist.ProcessGroup | None = None) -> list[list[float]]:
    out = [torch.zeros(len(values), dtype=torch.float64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, torch.tensor(values, dtype=torch.float64), group=group)
    return [o.tolist() for o in out]


def check_layout(tp: int, pp: int, refs: dict[str, list[dict[str, torch.Tensor]]]) -> dict[str, object]:
    """Run every mode on this TP×PP layout (DP = the rest of the world); assert; report numbers."""
    groups, (tp_rank, pp_rank, dp_rank) = megatron_groups(tp, pp)
    dp = dist.get_world_size(groups.dp)
    start = refs["svd"][0]
    report: dict[str, object] = {}
    finals: dict[str, dict[str, torch.Tensor]] = {}
    modes = [("owner", "replicated"), ("duplicated", "replicated")]
    if dp > 1:
        modes.append(("owner", "sharded"))
    where = f"TP{tp} PP{pp} DP{dp} rank {dist.get_rank()}"
    for backend in ("svd", "ns5"):
        for tp_mode, dp_mode in modes:
            label = f"{backend}/{tp_mode}/{dp_mode}"
            run = ShardedRun(groups, tp, tp_rank, pp, pp_rank, tp_mode=tp_mode, dp_mode=dp_mode,
                             ns_backend=backend)
            worst = 0.0
            for step in range(3):
                run.step(step)
                if step in (0, 2):
                    errors = run.change_errors(refs[backend][0], refs[backend][step + 1], start)
                    worst = max(worst, max(errors.values()))
                    bad = {k: v for k, v in errors.items() if not v <= TOL}
                    assert not bad, f"{label} step {step + 1}, {where}: {bad}"
                if step == 0:
                    grad_norm = float(torch.stack([t.norm() for t in full_tensors(100).values()]).norm())
                    assert run.opt.last_grad_norm == pytest.approx(grad_norm, rel=1e-6), label
                    stats = run.opt.comm_stats()["last_step"]
                    sent = sum(v["sent"] for k, v in stats.items() if k != "all_reduce")
                    report[f"bytes/{label}"] = [row[0] for row in _gather_floats([sent], groups.tp)]
            report[f"max_rel_err/{label}"] = worst
            if tp_mode == "owner" and tp * dp > 1:
                report[f"balance/{label}"] = run.opt.dualizer.plan_balance()
            report["matrix_bytes"] = run.gathered_bytes()
            finals[label] = {g: p.clone() for g, p in run.params.items()}
    for backend in ("svd", "ns5"):
        owner, dup = finals[f"{backend}/owner/replicated"], finals[f"{backend}/duplicated/replicated"]
        for g in owner:
            assert torch.allclose(owner[g], dup[g], rtol=0, atol=1e-6), (backend, g, where)
            if dp > 1:
                assert torch.equal(finals[f"{backend}/owner/sharded"][g], owner[g]), (backend, g, where)
    if tp > 1:
        local = ShardedRun(groups, tp, tp_rank, pp, pp_rank, tp_mode="local", ns_backend="svd")
        local.step(0)
        errors = local.change_errors(refs["svd"][0], refs["svd"][1], start)
        report["local_mode_rel_err"] = max(errors.values())
        spectral = [g for g in errors if "linear_" in g and g.endswith("weight")]
        assert min(errors[g] for g in spectral) > 1e-2, (errors, where)
        assert local.opt.comm_stats()["last_step"].keys() == {"all_reduce"}
    return report


def parity_worker(rank: int, world: int, layouts: list[tuple[int, int]], out_dir: str) -> None:
    refs = {b: reference_run(3, "fused", b) for b in ("svd", "ns5")}
    reports = {f"TP{tp}PP{pp}": check_layout(tp, pp, refs) for tp, pp in layouts}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(reports))


WORLDS = {  # world size -> (tp, pp) layouts, DP = the rest: TP 1/2/4, PP 1/2, DP 1/2 covered
    1: [(1, 1)],
    2: [(2, 1), (1, 2), (1, 1)],
    4: [(4, 1), (2, 2), (2, 1)],
}


@pytest.mark.parametrize("world", sorted(WORLDS), ids=[f"world{w}" for w in sorted(WORLDS)])
def test_parity_matrix(world: int, tmp_path: Path) -> None:
    run_workers(parity_worker, world, WORLDS[world], str(tmp_path))
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(reports) == world
    for tp, pp in WORLDS[world]:
        for r in (rep[f"TP{tp}PP{pp}"] for rep in reports):
            matrix_bytes = r["matrix_bytes"]
            for backend in ("svd", "ns5"):
                owner = r[f"bytes/{backend}/owner/replicated"]
                dup = r[f"bytes/{backend}/duplicated/replicated"]
                if tp == 1:
                    assert owner == [0.0] and dup == [0.0]
                    continue
                assert sum(owner) / tp == pytest.approx(2 * (tp - 1) / tp**2 * matrix_bytes, rel=1e-12)
                assert dup == [pytest.approx((tp - 1) / tp * matrix_bytes, rel=1e-12)] * tp


def errors_worker(rank: int, world: int) -> None:
    groups, (tp_rank, pp_rank, _) = megatron_groups(2, 1)
    run = ShardedRun(groups, 2, tp_rank, 1, pp_rank)
    run.step(0)
    params = {g: p.clone() for g, p in run.params.items()}
    momenta = {g: run.opt.state[p]["momentum_buffer"].clone() for g, p in run.params.items()}
    grads = full_tensors(101)
    for g, p in run.params.items():
        p.grad = run.shard(g, grads[g])
    if rank == 1:  # only one rank sees the overflow; both must skip
        next(iter(run.params.values())).grad[0, 0] = float("inf")
    run.opt.step()
    assert math.isnan(run.opt.last_grad_norm)
    for g, p in run.params.items():
        assert torch.equal(p, params[g]) and torch.equal(run.opt.state[p]["momentum_buffer"], momenta[g]), g
    if rank == 0:  # a missing grad on one rank is an error on every rank, not a hang
        next(iter(run.params.values())).grad = None
    else:
        next(iter(run.params.values())).grad.zero_()
    with pytest.raises(ValueError, match="needs a gradient"):
        run.opt.step()
    # Ranks that disagree on the schedule fail at construction instead of hanging mid-step.
    with pytest.raises(ValueError, match="schedules differ"):
        ShardedRun(groups, 2, tp_rank, 1, pp_rank, qkv_split="qkv" if rank else "fused")


def test_nonfinite_skip_missing_grad_and_plan_mismatch_fail_on_every_rank() -> None:
    run_workers(errors_worker, 2)

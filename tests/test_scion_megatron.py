"""ScionOptimizer on real megatron-core GPTModels (local spec, GQA + SwiGLU) in gloo processes.

- TP2 model in megatron DDP, real forward/backward: two steps equal the reference Scion run on
  the gathered (TP1) weights and gradients; a NaN gradient on one rank then makes ``step()``
  return ``(False, None, None)`` on both ranks with weights and masters unchanged.
- Momentum saved at TP2×PP2 through dist_checkpointing reloads at TP1×PP1 and the next step
  equals the step the TP2×PP2 run took.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from _dist import run_workers

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=96, seq_length=16, vocab_size=128, make_vocab_size_divisible_by=64)
SCION = dict(lr=0.02, scion_lr_embedding=0.05, scion_lr_output=0.01, scion_lr_gains=0.03,
             scion_radius_embedding=2.0, scion_radius_output=5.0, scion_radius_hidden=1.5,
             scion_momentum=0.5, weight_decay=0.1, scion_constrained=True, scion_ns_backend="svd")
TOL = 1e-5


def _setup(tp: int, pp: int):
    from disco_megatron.runtime import initialize_parallel, install_cpu_shims

    install_cpu_shims()
    return initialize_parallel(tp, pp)


def _reference(full: dict[str, torch.Tensor], config, model_cfg):
    """Reference Scion on full tensors with ScionOptimizer's groups (lr, radius, wd_mult)."""
    from disco_megatron.optim.layout import build_layout, reference_row_splits
    from disco_megatron.optim.scion import Scion

    groups: dict[tuple[str, str], list[torch.Tensor]] = {}
    row_splits = {}
    for name, p in full.items():
        layout = build_layout(name, p.shape, model_cfg, qkv_split=config.scion_qkv_split,
                              output_lmo=config.scion_output_lmo)
        groups.setdefault((layout.lr_group, layout.lmo), []).append(p)
        if (splits := reference_row_splits(layout)) is not None:
            row_splits[p] = splits
    return Scion([{"params": ps, "lr": config.group_lr(g), "radius": config.group_radius(g), "lmo": lmo,
                   "weight_decay": 0.0 if g == "gains" else config.weight_decay}
                  for (g, lmo), ps in groups.items()],
                 row_splits=row_splits, momentum=config.scion_momentum,
                 constrained=config.scion_constrained, ns_backend=config.scion_ns_backend)


def _gather_full(model, cfg, tensor_of) -> dict[str, torch.Tensor]:
    """Full (TP1-named) tensors of this stage: ``tensor_of(param)`` gathered over TP."""
    from megatron.core import parallel_state as ps

    from disco_megatron.models.sharding import gather_full_tensor, global_param_name

    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in model.named_parameters():
        local = tensor_of(p).detach().float().contiguous()
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local, group=ps.get_tensor_model_parallel_group())
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        full_name = global_param_name(name, ps.get_pipeline_model_parallel_rank(), cfg.num_layers,
                                      ps.get_pipeline_model_parallel_world_size())
        out[full_name] = gather_full_tensor(full_name, shards, dim, cfg.swiglu)
    return out


def _assert_same_change(before, after, ref_after, where: str) -> None:
    for name in before:
        want = ref_after[name] - before[name]
        err = float((after[name] - before[name] - want).norm() / want.norm())
        assert err <= TOL, f"{where}: {name} relative error {err:.2e}"


def tp2_ddp_worker(rank: int, world: int, qkv_split: str, bf16: bool) -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from disco_megatron.config import ModelConfig
    from disco_megatron.models import build_gpt_model
    from disco_megatron.optim import ScionConfig, get_scion_optimizer

    _setup(2, 1)
    cfg = ModelConfig(**MODEL, bf16=bf16)
    model = build_gpt_model(cfg)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    config = ScionConfig(**SCION, scion_qkv_split=qkv_split, bf16=bf16)
    opt = get_scion_optimizer(config, [ddp])
    master = dict(zip(opt.model_params, opt.main_params))
    assert all(m.dtype == torch.float32 and (m is p) == (p.dtype == torch.float32) for p, m in master.items())
    assert any(p.dtype == torch.bfloat16 for p in master) == bf16
    ref_params = {n: t.clone() for n, t in _gather_full(model, cfg, lambda p: p).items()}
    ref = _reference(ref_params, config, model.config)
    gen = torch.Generator().manual_seed(7)
    for step in range(2):
        tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(tokens[:, :-1], torch.arange(16).expand(2, -1), None, labels=tokens[:, 1:]).mean().backward()
        ddp.finish_grad_sync()
        grads = _gather_full(model, cfg, lambda p: p.main_grad)
        before = {n: t.clone() for n, t in ref_params.items()}
        for name, p in ref_params.items():
            p.grad = grads[name]
        success, grad_norm, _ = opt.step()
        ref.step()
        assert success
        assert grad_norm == pytest.approx(float(torch.stack([g.norm() for g in grads.values()]).norm()), rel=1e-6)
        _assert_same_change(before, _gather_full(model, cfg, lambda p: master[p]), ref_params,
                            f"TP2 DDP step {step + 1} rank {rank}")
        if bf16:  # the bf16 model params are refreshed from the stepped fp32 masters (fp32: they are the masters)
            assert all(torch.equal(p, m.to(p.dtype)) for p, m in master.items())
    stats = opt.comm_stats()["last_step"]
    assert stats["all_to_all"]["calls"] > 0 and stats["all_to_all"]["sent"] > 0
    # A non-finite grad on one rank: megatron's step contract says skipped, on every rank, nothing moved.
    kept = {p: (p.detach().clone(), m.detach().clone()) for p, m in master.items()}
    if rank == 1:
        next(iter(master)).main_grad[0] = float("nan")
    assert opt.step() == (False, None, None)
    assert all(torch.equal(p, a) and torch.equal(m, b) for (p, m), (a, b) in zip(master.items(), kept.values()))


@pytest.mark.parametrize("qkv_split,bf16", [("fused", False), ("qkv", True)],
                         ids=["fused-fp32", "qkv-bf16-masters"])
def test_tp2_ddp_equals_reference(qkv_split: str, bf16: bool) -> None:
    run_workers(tp2_ddp_worker, 2, qkv_split, bf16)


def _synthetic_grads(model, cfg, step: int, attr: str = "grad") -> None:
    """Set ``p.grad`` (or ``attr``: ``main_grad``, fp32 as megatron DDP's) to this rank's shard of a
    full gradient seeded by (global name, step)."""
    from megatron.core import parallel_state as ps

    from disco_megatron.models.sharding import global_param_name, shard_full_tensor

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for name, p in model.named_parameters():
        full_name = global_param_name(name, ps.get_pipeline_model_parallel_rank(), cfg.num_layers,
                                      ps.get_pipeline_model_parallel_world_size())
        full_shape = list(p.shape)
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        if dim is not None:
            full_shape[dim] *= tp
        gen = torch.Generator().manual_seed(zlib.crc32(full_name.encode()) + 1000 * step)
        setattr(p, attr, shard_full_tensor(full_name, torch.randn(full_shape, generator=gen), tp_rank, tp, dim,
                                           cfg.swiglu))


def _sharded(model, opt, is_loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    return {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=is_loading)}


def save_tp2pp2_worker(rank: int, world: int, ckpt: str, out: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from disco_megatron.config import ModelConfig
    from disco_megatron.models import build_gpt_model
    from disco_megatron.optim import ScionConfig, get_scion_optimizer

    _setup(2, 2)
    cfg = ModelConfig(**MODEL)
    model = build_gpt_model(cfg)
    opt = get_scion_optimizer(ScionConfig(**SCION, scion_qkv_split="qkv"), [model])
    _synthetic_grads(model, cfg, 0)
    assert opt.step()[0]
    dist_checkpointing.save(_sharded(model, opt, False), ckpt)
    before = _gather_full(model, cfg, lambda p: p)
    momentum = _gather_full(model, cfg, lambda p: opt.optimizer.state[p]["momentum_buffer"])
    _synthetic_grads(model, cfg, 1)
    assert opt.step()[0]
    after = _gather_full(model, cfg, lambda p: p)
    if ps.get_tensor_model_parallel_rank() == 0:
        torch.save({"before": before, "after": after, "momentum": momentum},
                   Path(out) / f"stage{ps.get_pipeline_model_parallel_rank()}.pt")


def load_tp1pp1_worker(rank: int, world: int, ckpt: str, out: str) -> None:
    from megatron.core import dist_checkpointing

    from disco_megatron.config import ModelConfig
    from disco_megatron.models import build_gpt_model
    from disco_megatron.optim import ScionConfig, get_scion_optimizer

    _setup(1, 1)
    cfg = ModelConfig(**MODEL)
    model = build_gpt_model(cfg)
    opt = get_scion_optimizer(ScionConfig(**SCION, scion_qkv_split="qkv"), [model])
    loaded = dist_checkpointing.load(_sharded(model, opt, True), ckpt)
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    saved: dict[str, dict[str, torch.Tensor]] = {"before": {}, "after": {}, "momentum": {}}
    for stage_file in sorted(Path(out).glob("stage*.pt")):
        for key, tensors in torch.load(stage_file).items():
            saved[key].update(tensors)
    params = dict(model.named_parameters())
    assert set(params) == set(saved["before"])
    for name, p in params.items():
        assert torch.equal(p.detach(), saved["before"][name]), name
        assert torch.equal(opt.optimizer.state[p]["momentum_buffer"], saved["momentum"][name]), name
    _synthetic_grads(model, cfg, 1)
    assert opt.step()[0]
    for name, p in params.items():
        assert torch.allclose(p.detach(), saved["after"][name], rtol=0, atol=1e-6), name


def test_momentum_saved_at_tp2pp2_reloads_at_tp1pp1(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    run_workers(save_tp2pp2_worker, 4, str(ckpt), str(tmp_path))
    run_workers(load_tp1pp1_worker, 1, str(ckpt), str(tmp_path))


# --- DP-sharded state (--scion-dp-mode sharded) through GPTModel, and its checkpoints -----------

def _build(tp: int, pp: int, dp_mode: str, bf16: bool, like=None):
    """(model, ScionOptimizer) at TP×PP (DP: the rest of the world); with ``like``, a twin in the
    same parallel state with its weights."""
    from disco_megatron.config import ModelConfig
    from disco_megatron.models import build_gpt_model
    from disco_megatron.optim import ScionConfig, get_scion_optimizer

    if like is None:
        _setup(tp, pp)
    cfg = ModelConfig(**MODEL, bf16=bf16)
    model = build_gpt_model(cfg)
    if like is not None:
        with torch.no_grad():
            for p, q in zip(model.parameters(), like.parameters()):
                p.copy_(q)
    opt = get_scion_optimizer(ScionConfig(**SCION, scion_qkv_split="qkv", bf16=bf16, scion_dp_mode=dp_mode), [model])
    return cfg, model, opt


def _layout(world: int, tp: int, pp: int) -> dict:
    return {"tp": tp, "pp": pp, "dp": world // (tp * pp)}


def _step(model, cfg, opt, step: int) -> None:
    _synthetic_grads(model, cfg, step, "main_grad")
    assert opt.step()[0]


def _replicated_state(model, cfg, opt) -> dict[str, dict[str, torch.Tensor]]:
    """Full momentum and fp32 masters of a replicated-mode optimizer, by TP1 name."""
    main = dict(zip(opt.model_params, opt.main_params))
    return {"momentum": _gather_full(model, cfg, lambda p: opt.optimizer.state[main[p]]["momentum_buffer"]),
            "master": _gather_full(model, cfg, lambda p: main[p])}


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert got.keys() <= want.keys(), where
    bad = [n for n in got if not torch.equal(got[n], want[n])]
    assert not bad, f"{where}: differ in {bad}"


def sharded_save_worker(rank: int, world: int, ckpt: str, out: str) -> None:
    """TP2×DP2, bf16 params: sharded bit-equal to replicated for 3 steps (checkpoint after step 1);
    then PP2×DP2, fp32: bit-equal to replicated and within TOL of the reference."""
    from disco_megatron.checkpoint import storage

    cfg, rep_model, rep = _build(2, 1, "replicated", True)
    _, model, opt = _build(2, 1, "sharded", True, like=rep_model)
    assert any(p.dtype == torch.bfloat16 for p in opt.model_params)
    record = {}
    for step in range(3):
        _step(rep_model, cfg, rep, step)
        _step(model, cfg, opt, step)
        params = _gather_full(model, cfg, lambda p: p)
        _assert_equal(params, _gather_full(rep_model, cfg, lambda p: p), f"TP2xDP2 step {step} rank {rank}")
        record[f"params{step}"] = params
        if step == 0:
            record |= _replicated_state(rep_model, cfg, rep)
            storage.save_checkpoint(ckpt, model, opt, None, storage.TrainState(iteration=1), {}, _layout(world, 2, 1))
    # each rank holds its plan's state only: momentum + master of what it owns
    held = sum(s.momentum.numel() + s.master.numel() for s in opt.optimizer.owned.values())
    assert held == 2 * opt.optimizer.plan.owned_numel(opt.optimizer.dualizer.me) > 0
    assert not opt.optimizer.state and all(m is p for m, p in zip(opt.main_params, opt.model_params))
    if rank == 0:
        torch.save(record, Path(out) / "record.pt")

    cfg, rep_model, rep = _build(1, 2, "replicated", False)
    _, model, opt = _build(1, 2, "sharded", False, like=rep_model)
    start = _gather_full(model, cfg, lambda p: p)
    ref_params = {n: t.clone() for n, t in start.items()}
    ref = _reference(ref_params, opt.config, model.config)
    for step in range(2):
        _step(rep_model, cfg, rep, step)
        _step(model, cfg, opt, step)
        before = {n: t.clone() for n, t in ref_params.items()}
        grads = _gather_full(model, cfg, lambda p: p.main_grad)
        for name, p in ref_params.items():
            p.grad = grads[name]
        ref.step()
        params = _gather_full(model, cfg, lambda p: p)
        _assert_equal(params, _gather_full(rep_model, cfg, lambda p: p), f"PP2xDP2 step {step} rank {rank}")
        _assert_same_change(before, params, ref_params, f"PP2xDP2 step {step} rank {rank}")


def resume_tp1_worker(rank: int, world: int, ckpt: str, out: str) -> None:
    """The TP2×DP2 sharded checkpoint at TP1×DP1 replicated: weights, momentum and masters bit-exact."""
    from disco_megatron.checkpoint import storage

    cfg, model, opt = _build(1, 1, "replicated", True)
    storage.load_checkpoint(ckpt, model, opt, None, {}, _layout(world, 1, 1))
    record = torch.load(Path(out) / "record.pt")
    _assert_equal(_gather_full(model, cfg, lambda p: p), record["params0"], "TP1 resume params")
    state = _replicated_state(model, cfg, opt)
    _assert_equal(state["momentum"], record["momentum"], "TP1 resume momentum")
    _assert_equal(state["master"], record["master"], "TP1 resume masters")
    _step(model, cfg, opt, 1)
    _assert_equal(_gather_full(model, cfg, lambda p: p), record["params1"], "TP1 resumed step")


def resume_tp2pp2_and_back_worker(rank: int, world: int, ckpt: str, out: str) -> None:
    """The checkpoint at TP2×PP2 (sharded over TP only) steps as the original run; saved there,
    it resumes at TP2×DP2 sharded and steps as the original run again."""
    from disco_megatron.checkpoint import storage

    record = torch.load(Path(out) / "record.pt")
    cfg, model, opt = _build(2, 2, "sharded", True)
    storage.load_checkpoint(ckpt, model, opt, None, {}, _layout(world, 2, 2))
    _assert_equal(_gather_full(model, cfg, lambda p: p), record["params0"], f"TP2xPP2 resume rank {rank}")
    _step(model, cfg, opt, 1)
    _assert_equal(_gather_full(model, cfg, lambda p: p), record["params1"], f"TP2xPP2 step rank {rank}")
    again = str(Path(out) / "again")
    storage.save_checkpoint(again, model, opt, None, storage.TrainState(iteration=2), {}, _layout(world, 2, 2))
    cfg, model, opt = _build(2, 1, "sharded", True)
    storage.load_checkpoint(again, model, opt, None, {}, _layout(world, 2, 1))
    _step(model, cfg, opt, 2)
    _assert_equal(_gather_full(model, cfg, lambda p: p), record["params2"], f"back at TP2xDP2 rank {rank}")


def test_sharded_state_through_gptmodel_and_checkpoints_across_layouts(tmp_path: Path) -> None:
    """--scion-dp-mode sharded on GPTModel: bit-equal to replicated (TP2×DP2 bf16, PP2×DP2 fp32,
    the latter within TOL of the reference); its checkpoint resumes bit-exactly at TP1×DP1
    replicated and at TP2×PP2, whose checkpoint resumes bit-exactly at TP2×DP2 sharded."""
    ckpt = str(tmp_path / "ckpt")
    run_workers(sharded_save_worker, 4, ckpt, str(tmp_path))
    run_workers(resume_tp1_worker, 1, ckpt, str(tmp_path))
    run_workers(resume_tp2pp2_and_back_worker, 4, ckpt, str(tmp_path))

"""Norm definitions vs hand values and numpy, sharded norms vs full ones over gloo TP groups,
the tracker's JSONL records vs norms of the full tensors, and the writers' round trips."""
from __future__ import annotations

import copy
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from _dist import run_workers
from disco_megatron.models.naming import tp_partition_dim
from disco_megatron.models.sharding import shard_full_tensor
from disco_megatron.norms import (
    JsonlNormWriter,
    NormTracker,
    PowerIterationState,
    TensorBoardNormWriter,
    aggregate_groups,
    matrix_norms,
    read_norms_jsonl,
    read_norms_tensorboard,
    sharded_norms,
    vector_norms,
)
from disco_megatron.norms.definitions import SIGMA_BOUND
from disco_megatron.norms.owners import optimizer_svd_owners, planned_svd_owners, svd_owners
from disco_megatron.norms.sharded import sharded_norms_many
from disco_megatron.optim.layout import build_layout
from disco_megatron.optim.plan import build_exchange_plan

# Rows [3, 4, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0]: orthogonal rows, singular values 5, 2, 0.
HAND = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
# Sharded norms are fp32 sums, maxima and SVDs of the shards; the references are float64 of the
# same fp32 values. Measured worst relative error of those: 1.5e-7 (2 ulp of fp32), so FP32_REL
# leaves ~7x headroom. The supremum is a max: exact in any precision. Only σ_max by Lanczos
# (rms_to_rms without the condition number) is an iterative estimate: SIGMA_REL bounds its convergence.
FP32_REL = 1e-6
SIGMA_REL = 1e-3


def _rel(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / max(abs(b), 1e-30)


def _assert_norms_close(got: dict, expected: dict, rel: float, where: str, sigma_rel: float | None = None) -> None:
    """Every norm within ``rel`` (rms_to_rms within ``sigma_rel`` when given), the supremum exact;
    a recorded σ_max bound holds and is within the tolerance."""
    got = dict(got)
    bound = got.pop(SIGMA_BOUND, None)
    if bound is not None and "rms_to_rms" in expected:
        assert bound <= SIGMA_REL and _rel(got["rms_to_rms"], expected["rms_to_rms"]) <= bound + FP32_REL, \
            f"{where}: σ_max bound {bound}, error {_rel(got['rms_to_rms'], expected['rms_to_rms'])}"
    assert set(got) == set(expected), f"{where}: norms {sorted(got)} != {sorted(expected)}"
    for norm, value in expected.items():
        tolerance = 0.0 if norm == "supremum" else sigma_rel if norm == "rms_to_rms" and sigma_rel else rel
        assert _rel(got[norm], value) <= tolerance, f"{where}: {norm} {got[norm]} vs {value} (rel {tolerance})"


def test_matrix_norms_hand_values():
    got = matrix_norms(HAND, with_condition=True)
    expected = {
        "rms_to_rms": 5 * math.sqrt(4 / 3),      # σ_max √(d_in/d_out)
        "rms_to_inf": 5 * math.sqrt(4),          # largest row ‖[3,4,0,0]‖ = 5, times √d_in
        "l1_to_rms": 4 / math.sqrt(3),           # largest column ‖[4,0,0]‖ = 4, over √d_out
        "frobenius": math.sqrt(29),
        "rms": math.sqrt(29 / 12),
        "supremum": 4.0,
        "condition_number": math.inf,            # rank 2 of 3: σ_min = 0
    }
    _assert_norms_close(got, expected, 1e-12, "HAND")


def test_matrix_norms_match_numpy_and_operator_definition():
    W = torch.randn(12, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A = W.numpy()
    d_out, d_in = A.shape
    got = matrix_norms(W, with_condition=True)
    singular = np.linalg.svd(A, compute_uv=False)
    assert _rel(got["rms_to_rms"], singular[0] * math.sqrt(d_in / d_out)) < 1e-12
    assert _rel(got["condition_number"], singular[0] / singular[-1]) < 1e-10
    assert _rel(got["rms_to_inf"], max(np.sqrt((row ** 2).sum()) for row in A) * math.sqrt(d_in)) < 1e-12
    assert _rel(got["l1_to_rms"], np.sqrt((A ** 2).sum(axis=0)).max() / math.sqrt(d_out)) < 1e-12
    # Operator norms are suprema of ‖Wx‖_out/‖x‖_in: attained at the maximisers, never exceeded.
    x = torch.randn(d_in, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rms = lambda t: t.square().mean(0).sqrt()  # noqa: E731
    assert (rms(W @ x) / rms(x)).max() <= got["rms_to_rms"] * (1 + 1e-12)
    assert ((W @ x).abs().max(0).values / rms(x)).max() <= got["rms_to_inf"] * (1 + 1e-12)
    best_row = W[W.norm(dim=1).argmax()]
    assert _rel(float((W @ best_row).abs().max() / rms(best_row[:, None])), got["rms_to_inf"]) < 1e-12
    one_hot = torch.eye(d_in, dtype=torch.float64)  # ‖e_i‖_1 = 1: ℓ1→RMS is the largest column RMS
    assert _rel(float(rms(W @ one_hot).max()), got["l1_to_rms"]) < 1e-12


def test_condition_number_and_vector_norms():
    assert _rel(matrix_norms(torch.diag(torch.tensor([3.0, 0.5])), True)["condition_number"], 6.0) < 1e-12
    assert "condition_number" not in matrix_norms(HAND)
    # 1-D tensors are diag(b), as the reference's calculate_norm makes them.
    b = torch.tensor([1.0, -2.0, 2.0, 0.5])
    got = vector_norms(b, with_condition=True)
    _assert_norms_close(got, {**matrix_norms(torch.diag(b), with_condition=True), "rms": math.sqrt(9.25 / 4)},
                        1e-12, "vector")
    assert got["condition_number"] == 4.0 and got["rms_to_inf"] == 4.0 and got["l1_to_rms"] == 1.0


def test_aggregate_groups_hand_values():
    norms = {
        "a": {"rms_to_rms": 1.0, "rms_to_inf": 7.0, "l1_to_rms": 0.5, "frobenius": 3.0, "rms": 1.0,
              "supremum": 2.0},
        "b": {"rms_to_rms": 2.0, "rms_to_inf": 1.0, "l1_to_rms": 0.25, "frobenius": 4.0, "rms": 2.0,
              "supremum": 5.0},
        "g": {"rms": 1.0, "supremum": 1.5, "frobenius": 2.0},
        "h": {"rms": 1.0, "supremum": math.nan, "frobenius": 2.0},
    }
    numels = {"a": 9, "b": 4, "g": 4, "h": 4}
    groups = aggregate_groups(norms, numels, lambda name: "hidden" if name in "ab" else "gains")
    hidden = {"rms_to_rms": 2.0, "rms_to_inf": 7.0, "l1_to_rms": 0.5, "supremum": 5.0,
              "frobenius": 5.0, "rms": 5.0 / math.sqrt(13)}
    _assert_norms_close(groups["hidden"], hidden, 1e-12, "hidden")
    assert groups["gains"]["frobenius"] == pytest.approx(math.sqrt(8))
    assert math.isnan(groups["gains"]["supremum"])


def _full(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sharded_worker(rank: int, world: int) -> None:
    groups = {1: [dist.new_group([r]) for r in range(world)],
              2: [dist.new_group([0, 1]), dist.new_group([2, 3])],
              4: [dist.new_group(list(range(world)))]}
    for tp, by_index in groups.items():
        group, tp_rank = by_index[rank // tp], rank % tp
        for pdim in (0, 1):
            for shape, seed in (((32, 24), 1), ((24, 48), 2)):
                W = _full(shape, seed)
                shard = W.chunk(tp, dim=pdim)[tp_rank]
                where = f"tp{tp} pdim{pdim} {shape}"
                _assert_norms_close(sharded_norms(shard, pdim, group, key="w"), matrix_norms(W), FP32_REL, where,
                                    SIGMA_REL)
                _assert_norms_close(sharded_norms(shard, pdim, group, with_condition=True),
                                    matrix_norms(W, with_condition=True), FP32_REL, where + " condition")
            # Tolerance: every call's σ_max is within its recorded bound, the bound within tol,
            # cold and warm-started (a slowly changing matrix).
            W0, D = _full((40, 32), 3), _full((40, 32), 4)
            state = PowerIterationState(exact_max_dim=0)  # Lanczos, not the small matrices' exact SVD
            for call in range(4):
                W = W0 + 0.01 * call * D
                got = sharded_norms(W.chunk(tp, dim=pdim)[tp_rank], pdim, group, state=state, key="w")
                _assert_norms_close(got, matrix_norms(W), FP32_REL, f"tp{tp} pdim{pdim} call {call}", SIGMA_REL)
        b = _full((16,), 5)
        _assert_norms_close(sharded_norms(b.chunk(tp)[tp_rank], 0, group), vector_norms(b), FP32_REL, f"tp{tp} 1-D")
        _assert_norms_close(sharded_norms(b, None, group), vector_norms(b), FP32_REL, f"tp{tp} replicated 1-D")
        _assert_norms_close(sharded_norms(_full((8, 12), 6), None, group), matrix_norms(_full((8, 12), 6)),
                            FP32_REL, f"tp{tp} replicated 2-D", SIGMA_REL)


def test_sharded_norms_equal_full_norms_tp_1_2_4():
    run_workers(_sharded_worker, 4)


# (key, full shape, partition_dim, warm): split and replicated matrices and vectors; the warm ones
# have a stored σ_max vector. A tolerance no matrix reaches makes each run exactly ITERS products.
BATCH_ITEMS = (("w0_cold", (24, 16), 0, False), ("w1_warm", (16, 40), 1, True), ("w0_warm", (32, 8), 0, True),
               ("w1_cold", (12, 20), 1, False), ("r_warm", (10, 6), None, True), ("b0", (16,), 0, False),
               ("rb", (6,), None, False))
ITERS = 3


def _batch_worker(rank: int, world: int) -> None:
    group = dist.new_group([0, 1])
    shards = [(key, _full(shape, 30 + i).chunk(world, dim=pdim)[rank] if pdim is not None else _full(shape, 30 + i),
               pdim) for i, (key, shape, pdim, _) in enumerate(BATCH_ITEMS)]
    primed = PowerIterationState(tol=1e-12, max_iters=ITERS, exact_max_dim=0)
    for i, ((key, shard, pdim), (*_, warm)) in enumerate(zip(shards, BATCH_ITEMS)):
        if warm:  # a stored vector from another matrix: the warm start is not the answer
            sharded_norms(_full(tuple(shard.shape), 60 + i), pdim, group, state=primed, key=key)
    calls = []
    real_all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        single_state, many_state = copy.deepcopy(primed), copy.deepcopy(primed)
        single = {key: sharded_norms(shard, pdim, group, state=single_state, key=key) for key, shard, pdim in shards}
        single_calls, calls[:] = len(calls), []
        many = sharded_norms_many(shards, group, state=many_state)
        many_calls = len(calls)
    finally:
        dist.all_reduce = real_all_reduce
    assert list(many) == [key for key, _, _ in shards] and many == single, f"rank {rank}: {many} != {single}"
    assert many_state.vectors.keys() == single_state.vectors.keys()
    assert all(torch.equal(many_state.vectors[k], v) for k, v in single_state.vectors.items())
    split = [(pdim, warm, len(shape)) for _, shape, pdim, warm in BATCH_ITEMS if pdim is not None]
    iters = [ITERS for pdim, warm, dims in split if dims == 2]
    assert many_calls == 2 + max(iters), f"rank {rank}: {many_calls} all-reduces"
    assert single_calls == 2 * len(split) + sum(iters), f"rank {rank}: {single_calls} all-reduces"
    for i, (key, shape, pdim, _) in enumerate(BATCH_ITEMS):  # Lanczos-free norms vs the full tensor
        full = _full(shape, 30 + i)
        expected = matrix_norms(full) if full.dim() == 2 else vector_norms(full)
        exact = {n: v for n, v in expected.items() if n != "rms_to_rms"}
        _assert_norms_close({n: many[key][n] for n in exact}, exact, FP32_REL, key)
    with_condition = sharded_norms_many(shards, group, with_condition=True)
    assert with_condition == {key: sharded_norms(shard, pdim, group, key=key, with_condition=True)
                              for key, shard, pdim in shards}
    with pytest.raises(ValueError, match="duplicate keys"):
        sharded_norms_many(shards[:1] * 2, group)


def test_sharded_norms_many_equals_per_tensor_with_one_collective_per_round():
    run_workers(_batch_worker, 2)


# Fake megatron parameters (global names, full TP1 shapes) on two pipeline stages.
STAGES = (
    {"embedding.word_embeddings.weight": (16, 8),
     "decoder.layers.0.self_attention.linear_qkv.weight": (24, 8),
     "decoder.layers.0.self_attention.linear_proj.weight": (8, 8),
     "decoder.layers.0.input_layernorm.weight": (8,)},
    {"decoder.layers.1.mlp.linear_fc1.weight": (32, 8),
     "decoder.layers.1.mlp.linear_fc2.weight": (8, 16),
     "decoder.final_layernorm.weight": (8,),
     "output_layer.weight": (16, 8)},
)
ALL_SHAPES = {name: shape for stage in STAGES for name, shape in stage.items()}
# The model those shapes are: 2 heads in 2 query groups of 4 channels (QKV rows [q|k|v] per group), SwiGLU ffn 16.
MODEL = types.SimpleNamespace(hidden_size=8, num_attention_heads=2, num_query_groups=2, kv_channels=4,
                              ffn_hidden_size=16, gated_linear_unit=True)
STEPS, INTERVAL = 5, 2
LAYOUTS = ((2, 2), (1, 2), (2, 1))  # (TP, PP) on 4 ranks: DP 1, 2, 2


def _trajectory(name: str, step: int) -> torch.Tensor:
    """W after ``step`` optimizer steps; step s adds (0.01·s)·D, computed as the workers do."""
    index = sorted(ALL_SHAPES).index(name)
    W, D = _full(ALL_SHAPES[name], 100 + index), _full(ALL_SHAPES[name], 200 + index)
    for s in range(1, step + 1):
        W = W + (0.01 * s) * D
    return W


def _lrs(step: int) -> dict[str, float]:
    return {"hidden": 0.01 / step, "output": 0.02}


def _layout_groups(rank: int, world: int, tp: int, pp: int
                   ) -> tuple[tuple[int, int, int], dist.ProcessGroup, dist.ProcessGroup]:
    """((tp, dp, pp) rank, TP group, PP group) in megatron's order rank = tp_r + tp·(dp_r + dp·pp_r)."""
    dp = world // (tp * pp)
    coords = {r: (r % tp, (r // tp) % dp, r // (tp * dp)) for r in range(world)}
    tp_group = pp_group = None
    for key in sorted({(d, p) for _, d, p in coords.values()}):
        group = dist.new_group([r for r, c in coords.items() if (c[1], c[2]) == key])
        tp_group = group if (coords[rank][1], coords[rank][2]) == key else tp_group
    for key in sorted({(t, d) for t, d, _ in coords.values()}):
        group = dist.new_group([r for r, c in sorted(coords.items(), key=lambda rc: rc[1][2])
                                if (c[0], c[1]) == key])
        pp_group = group if (coords[rank][0], coords[rank][1]) == key else pp_group
    return coords[rank], tp_group, pp_group


def _stage_params(tp: int, pp: int, tp_rank: int, pp_rank: int) -> list[tuple[str, torch.nn.Parameter]]:
    """This rank's shards of its stage's parameters at step 0, with megatron's TP attributes."""
    params = []
    for name in [n for stage in (STAGES if pp == 1 else [STAGES[pp_rank]]) for n in stage]:
        pdim = tp_partition_dim(name)
        p = torch.nn.Parameter(shard_full_tensor(name, _trajectory(name, 0), tp_rank, tp, pdim, glu=True))
        p.tensor_model_parallel, p.partition_dim = pdim is not None, pdim if pdim is not None else -1
        params.append((name, p))
    return params


def _tracker_worker(rank: int, world: int, directory: str) -> None:
    for tp, pp in LAYOUTS:
        (tp_rank, dp_rank, pp_rank), tp_group, pp_group = _layout_groups(rank, world, tp, pp)
        params = _stage_params(tp, pp, tp_rank, pp_rank)
        writer = JsonlNormWriter(f"{directory}/tp{tp}_pp{pp}.jsonl")
        tracker = NormTracker(params, INTERVAL, tp_group, pp_group, dp_rank, pp_rank, pp, [writer], model_cfg=MODEL)
        for step in range(1, STEPS + 1):
            tracker.before_step(step)
            for name, p in params:
                full = _trajectory(name, step)
                p.data.copy_(shard_full_tensor(name, full, tp_rank, tp, tp_partition_dim(name), glu=True))
            record = tracker.after_step(step, tokens=1000 * step,
                                        loss=1.0 / step if pp_rank == pp - 1 else None, lrs=_lrs(step))
            writes = tracker.should_log(step) and (tp_rank, dp_rank, pp_rank) == (0, 0, pp - 1)
            assert (record is not None) == writes, f"rank {rank} tp{tp} pp{pp} step {step}: record {record}"
    _condition_runs(rank, world, directory)


@pytest.fixture(scope="module")
def tracker_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """norms.jsonl of every layout in LAYOUTS and the condition-number runs of COND_LAYOUTS (SVD
    calls per rank), from one run of 4 gloo processes."""
    directory = tmp_path_factory.mktemp("tracker")
    run_workers(_tracker_worker, 4, str(directory))
    return directory


def _reference_matrices(name: str, W: torch.Tensor) -> dict[str, torch.Tensor]:
    """The matrices the reference measures, by key: q/k/v rows per query group ([q|k|v], 4 rows
    each here), gate/up halves, the embedding transposed to [hidden, vocab]."""
    if name.endswith("linear_qkv.weight"):
        groups = W.reshape(2, 3, 4, -1)
        return {f"{name}:{part}": groups[:, i].reshape(8, -1) for i, part in enumerate("qkv")}
    if name.endswith("linear_fc1.weight"):
        return {f"{name}:gate": W[:16], f"{name}:up": W[16:]}
    return {name: W.t() if name.startswith("embedding.") else W}


def _expected_norms(W: torch.Tensor) -> dict[str, float]:
    return matrix_norms(W) if W.dim() == 2 else vector_norms(W)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_tracker_writes_records_of_full_norms(tracker_runs: Path, tp: int, pp: int):
    records = read_norms_jsonl(str(tracker_runs / f"tp{tp}_pp{pp}.jsonl"))
    assert [r["step"] for r in records] == [2, 4]
    keys = [key for name in ALL_SHAPES for key in _reference_matrices(name, _trajectory(name, 0))]
    for record in records:
        step = record["step"]
        assert record["tokens"] == 1000 * step and record["loss"] == pytest.approx(1.0 / step)
        assert record["lr"] == pytest.approx(_lrs(step))
        assert "updates" not in record  # no step source: only the weight change is known
        assert list(record["params"]) == keys == list(record["weight_changes"])
        for name in ALL_SHAPES:
            after, before = _trajectory(name, step), _trajectory(name, step - 1)
            for key, W in _reference_matrices(name, after).items():
                _assert_norms_close(record["params"][key], _expected_norms(W), FP32_REL, f"{key} param", SIGMA_REL)
            for key, W in _reference_matrices(name, after - before).items():
                _assert_norms_close(record["weight_changes"][key], _expected_norms(W), FP32_REL,
                                    f"{key} weight change", SIGMA_REL)
        for kind, key in (("param", "params"), ("weight_change", "weight_changes")):
            groups, per = record["groups"][kind], record[key]
            assert set(groups) == {"embedding", "attention", "mlp", "output", "gains"}
            attention = [v for k, v in per.items() if ".self_attention." in k]
            assert len(attention) == 4  # q, k, v, proj
            assert groups["attention"]["rms_to_rms"] == max(a["rms_to_rms"] for a in attention)
            assert groups["attention"]["frobenius"] == pytest.approx(
                math.sqrt(sum(a["frobenius"] ** 2 for a in attention)), rel=1e-12)
            assert groups["output"]["rms_to_inf"] == per["output_layer.weight"]["rms_to_inf"]
            gains = [per[n] for n in ALL_SHAPES if n.endswith("layernorm.weight")]
            assert groups["gains"]["rms"] == pytest.approx(
                math.sqrt(sum(g["frobenius"] ** 2 for g in gains) / 16), rel=1e-12)


class StepSource:
    """A step source whose step is 0.5 everywhere, recording the tracker's calls."""

    def __init__(self, p: torch.nn.Parameter) -> None:
        self.p, self.calls = p, []

    def before_step(self) -> None:
        self.calls.append("before")

    def __call__(self) -> dict[int, torch.Tensor]:
        self.calls.append("steps")
        return {id(self.p): torch.full_like(self.p, 0.5)}


def test_tracker_validates_and_skips_non_logging_steps():
    with pytest.raises(ValueError, match="--norm-log-interval"):
        NormTracker([], 0, None, None, 0, 0, 1, [], model_cfg=MODEL)
    with pytest.raises(ValueError, match="unknown parameter"):
        NormTracker([("not.a.megatron.name", torch.nn.Parameter(torch.ones(2)))], 1, None, None, 0, 0, 1, [],
                    model_cfg=MODEL)
    seen: list[dict] = []

    class ListWriter:
        def write(self, record: dict) -> None:
            seen.append(record)

    p = torch.nn.Parameter(torch.ones(4, 4))
    steps = StepSource(p)
    tracker = NormTracker([("output_layer.weight", p)], 3, None, None, 0, 0, 1, [ListWriter()], model_cfg=MODEL,
                          step_source=steps)
    assert [s for s in range(1, 10) if tracker.should_log(s)] == [3, 6, 9]
    tracker.before_step(2)
    assert tracker.after_step(2, tokens=1, loss=None, lrs={}) is None and not seen
    with pytest.raises(RuntimeError, match="before_step"):
        tracker.after_step(3, tokens=1, loss=None, lrs={})
    tracker.before_step(3)
    p.data.mul_(3.0)
    record = tracker.after_step(3, tokens=7, loss=None, lrs={"output": 0.1})
    assert seen == [record] and record["loss"] is None and steps.calls == ["before", "steps"]
    # "updates" is what the step source says the optimizer took; the weight change is kept apart.
    assert record["updates"]["output_layer.weight"]["supremum"] == pytest.approx(0.5)
    assert record["weight_changes"]["output_layer.weight"]["supremum"] == pytest.approx(2.0)
    assert record["params"]["output_layer.weight"]["rms_to_rms"] == pytest.approx(12.0, rel=1e-5)


def _record() -> dict:
    """A norm record whose values are exact in float32 (TensorBoard stores float32)."""
    return {"step": 7, "tokens": 7168, "loss": 3.25, "lr": {"hidden": 0.02, "output": 0.005},
            "params": {"output_layer.weight": {"rms_to_inf": 11.5, "frobenius": 4.0},
                       "decoder.final_layernorm.weight": {"rms": 1.0, "supremum": 1.25}},
            "updates": {"output_layer.weight": {"rms_to_inf": 0.125, "frobenius": 0.5},
                        "decoder.final_layernorm.weight": {"rms": 0.015625, "supremum": 0.0625}},
            "groups": {"param": {"output": {"rms_to_inf": 11.5}, "gains": {"rms": 1.0}},
                       "update": {"output": {"rms_to_inf": 0.125}, "gains": {"rms": 0.015625}}}}


def test_tensorboard_writer_scalars_readable(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    summary = SummaryWriter(log_dir=str(tmp_path / "tensorboard"))
    TensorBoardNormWriter(summary).write(_record())
    summary.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expected = {"norms/param/rms_to_inf/output_layer.weight": 11.5,
                "norms/update/supremum/decoder.final_layernorm.weight": 0.0625,
                "norms/group/param/rms_to_inf/output": 11.5,
                "norms/group/update/rms/gains": 0.015625,
                "norms/lr/output": 0.005, "norms/loss": 3.25, "norms/tokens": 7168}
    for tag, value in expected.items():
        (event,) = events.Scalars(tag)
        assert event.step == 7 and event.value == pytest.approx(value, rel=1e-6), tag
    assert len(events.Tags()["scalars"]) == 2 + 2 + 4 + 4 + 4  # tokens+loss, lr, params, updates, groups
    (back,) = read_norms_tensorboard(str(tmp_path))
    assert back["params"] == _record()["params"] and back["groups"] == _record()["groups"]
    assert back["tokens"] == 7168 and back["lr"]["hidden"] == pytest.approx(0.02)


def test_jsonl_writer_strict_json_and_resume_after_crash(tmp_path: Path):
    path = tmp_path / "run" / "norms.jsonl"
    writer = JsonlNormWriter(str(path))
    first = {**_record(), "step": 6, "loss": math.nan}
    writer.write(first)
    writer.write(_record())
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and "NaN" not in lines[0] and json.loads(lines[0])["loss"] is None
    with open(path, "a") as f:
        f.write('{"step": 8, "tok')  # a crash mid-write
    resumed = JsonlNormWriter(str(path))  # the run resumes from its step-6 checkpoint
    redone = {**_record(), "loss": 3.0}
    resumed.write(redone)
    resumed.write({**_record(), "step": 8})
    with pytest.warns(UserWarning, match=r"norms.jsonl:3: skipped"):
        records = read_norms_jsonl(str(path))
    assert records == [json.loads(lines[0]), redone, {**_record(), "step": 8}]


COND_LAYOUTS = ((2, 2), (2, 1))  # (TP, PP) on 4 ranks: DP 1, 2


def _stage_plan(names: list[str], tp: int, tp_rank: int):
    """The optimizer's exchange plan of a stage's parameters (the same owners on every TP rank)."""
    layouts = [(name, build_layout(name, tuple(_shard_shape(name, tp)), MODEL, tp_size=tp, tp_rank=tp_rank))
               for name in names]
    return build_exchange_plan([layout for _, layout in layouts], tp_size=tp), layouts


def _shard_shape(name: str, tp: int) -> list[int]:
    shape, pdim = list(ALL_SHAPES[name]), tp_partition_dim(name)
    if pdim is not None:
        shape[pdim] //= tp
    return shape


def _condition_runs(rank: int, world: int, directory: str) -> None:
    """One logged step with condition numbers; every rank records the matrices it ran an SVD of."""
    for tp, pp in COND_LAYOUTS:
        (tp_rank, dp_rank, pp_rank), tp_group, pp_group = _layout_groups(rank, world, tp, pp)
        params = _stage_params(tp, pp, tp_rank, pp_rank)
        plan, layouts = _stage_plan([name for name, _ in params], tp, tp_rank)
        writer = JsonlNormWriter(f"{directory}/cond_tp{tp}_pp{pp}.jsonl")
        tracker = NormTracker(params, 1, tp_group, pp_group, dp_rank, pp_rank, pp, [writer], model_cfg=MODEL,
                              with_condition=True, svd_owners=planned_svd_owners(plan, layouts))
        calls: list[tuple[list[int], float]] = []
        real_svdvals = torch.linalg.svdvals

        def recording(W, *args, **kwargs):
            calls.append((sorted(W.shape), float(W.double().square().sum())))
            return real_svdvals(W, *args, **kwargs)

        tracker.before_step(1)
        for name, p in params:
            p.data.copy_(shard_full_tensor(name, _trajectory(name, 1), tp_rank, tp, tp_partition_dim(name), glu=True))
        torch.linalg.svdvals = recording
        try:
            tracker.after_step(1, tokens=1, loss=None, lrs={})
        finally:
            torch.linalg.svdvals = real_svdvals
        Path(f"{directory}/svd_tp{tp}_pp{pp}_rank{rank}.json").write_text(
            json.dumps({"coords": [tp_rank, dp_rank, pp_rank], "calls": calls}))


def test_condition_number_exact_one_svd_per_matrix_on_the_optimizer_owner(tracker_runs: Path):
    for tp, pp in COND_LAYOUTS:
        (record,) = read_norms_jsonl(str(tracker_runs / f"cond_tp{tp}_pp{pp}.jsonl"))
        ranks = [json.loads((tracker_runs / f"svd_tp{tp}_pp{pp}_rank{r}.json").read_text()) for r in range(4)]
        for stage, names in enumerate(STAGES if pp == 2 else [list(ALL_SHAPES)]):
            plan, layouts = _stage_plan(list(names), tp, 0)
            owners = plan.owners  # the optimizer's owner TP rank of each matrix it exchanges
            assert {"decoder.layers.0.self_attention.linear_qkv.weight:k",
                    "decoder.layers.1.mlp.linear_fc1.weight:up"} & owners.keys()
            stage_calls = {tuple(r["coords"]): r["calls"] for r in ranks if r["coords"][2] == stage}
            expected_count = 0
            for name in names:
                for kind, W in (("params", _trajectory(name, 1)), ("weight_changes",
                                                                   _trajectory(name, 1) - _trajectory(name, 0))):
                    for key, M in _reference_matrices(name, W).items():
                        got = record[kind][key]
                        expected = _expected_norms(M)
                        singular = torch.linalg.svdvals(M.double()) if M.dim() == 2 else M.double().abs()
                        assert _rel(got["condition_number"], float(singular.max() / singular.min())) <= 1e-5, key
                        assert _rel(got["rms_to_rms"], expected["rms_to_rms"]) <= 1e-5, key
                        if M.dim() == 1:
                            continue
                        expected_count += 1
                        fro = float(M.double().square().sum())
                        where = [c for c, calls in stage_calls.items() for shape, f in calls
                                 if shape == sorted(M.shape) and abs(f - fro) <= 1e-5 * fro]
                        assert len(where) == 1, f"tp{tp} pp{pp} {kind} {key}: SVD ran on {where}"
                        assert where[0][1] == 0 and where[0][0] == owners.get(key, where[0][0]), \
                            f"{key}: SVD on {where[0]}, owner {owners.get(key)}"
            assert sum(len(calls) for calls in stage_calls.values()) == expected_count


def test_optimizer_svd_owners_map_stage_local_keys_to_global_names():
    # Stage 1 of PP2 at TP2: the optimizer's layouts carry stage-local names (layer 0), the tracker global ones (layer 1).
    shapes = {"mlp.linear_fc1.weight": (16, 8), "mlp.linear_fc2.weight": (8, 8), "self_attention.linear_qkv.weight": (12, 8)}
    local = {f"decoder.layers.0.{n}": s for n, s in shapes.items()} | {"output_layer.weight": (8, 8)}
    params = {name: torch.nn.Parameter(torch.empty(shape)) for name, shape in local.items()}
    layouts = [build_layout(name, shape, MODEL, tp_size=2, tp_rank=1) for name, shape in local.items()]
    plan = build_exchange_plan(layouts, tp_size=2)
    optimizer = types.SimpleNamespace(model_params=list(params.values()),
                                      optimizer=types.SimpleNamespace(plan=plan, layouts=layouts))
    named = [(name.replace("layers.0.", "layers.1."), p) for name, p in reversed(params.items())]
    expected = {key.replace("layers.0.", "layers.1."): owner for key, owner in plan.owners.items()}
    assert len(expected) == 6 and set(plan.owners.values()) == {0, 1}  # q, k, v, gate, up, fc2 over both ranks
    assert optimizer_svd_owners(optimizer, named) == expected  # output layer: row-local LMO, not exchanged
    assert optimizer_svd_owners(types.SimpleNamespace(optimizer=object()), named) == {}  # e.g. Adam
    sharded = build_exchange_plan(layouts, tp_size=2, dp_size=2, dp_mode="sharded")
    assert sharded.slots == 4 and planned_svd_owners(sharded, list(zip(local, layouts))) == {}


def test_svd_owners_keep_the_plan_and_balance_the_rest():
    matrices = [("planned", 64, 64), ("big", 32, 32), ("small_a", 8, 8), ("small_b", 8, 8), ("small_c", 8, 8)]
    # Not planned: longest first to the least-loaded rank (ties: the lower rank); big costs 64x a small one,
    # so big -> 0 and every small one -> 1. The plan's own owner stays, and a key not asked for is dropped.
    assert svd_owners(matrices, {"planned": 1, "elsewhere": 0}, 2) == {
        "planned": 1, "big": 0, "small_a": 1, "small_b": 1, "small_c": 1}

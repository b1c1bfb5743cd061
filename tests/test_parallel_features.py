"""Megatron's parallel features beside TP/PP, through ``disco-pretrain``: Scion stays exact under each.

- ``--sequence-parallel`` at TP2 trains the losses of TP1 (the gains' gradients, each from half the
  tokens, must be all-reduced over TP by ``finalize_model_grads``: without that the loss of step 2 moves
  by ~4e-4).
- ``--virtual-pipeline-model-parallel-size 2`` at PP2 (the interleaved schedule, two model chunks per
  stage) resumes TP1's checkpoint (weights and momentum) and trains TP1's losses, and its own checkpoint
  holds TP1's tensors under the same global names. It starts from TP1's checkpoint rather than from its
  own init because megatron offsets the init seed per pipeline stage, so PP layouts start elsewhere.
  Its norm statistics name every matrix by its global layer, as TP1's do, with TP1's values.
- ``--overlap-grad-reduce`` at DP2 trains TP1's losses, and the bucket all-reduce really starts during
  the backward pass on gloo (a pending handle before ``finalize_model_grads`` waits for it), from the
  second step on: megatron's DDP learns in the first step which gradients each bucket waits for.
- ``--context-parallel-size`` runs on TransformerEngine only (a GPU); here the optimizer's groups are
  checked: CP ranks join DP.

Losses agree to 1e-5 relative: TP/DP/PP change only the order of fp32 reductions.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from disco_megatron.config import RunDir
from tests._dist import run_workers
from tests._launch import TINY_MODEL, torchrun, train_losses
from tests.test_reliability import checkpoint_tensors

ITERS = 4
RTOL = 1e-5
NORM_RTOL = 2e-4  # sigma_max: each run's Lanczos estimate is within 1e-4 (relative) of the true value


def _args(run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_MODEL, "--optimizer", "scion", "--lr", "0.01", "--micro-batch-size", "1", "--global-batch-size",
            "4", "--train-iters", str(ITERS), "--log-interval", "1", "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory) -> Path:
    """The reference: one process, checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("parallel") / "tp1"
    result = torchrun(1, _args(run_dir, "--save-interval", "2", "--norm-log-interval", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _assert_losses_match(run_dir: Path, reference: Path, first: int = 1) -> None:
    losses, expected = train_losses(run_dir), train_losses(reference)
    assert sorted(losses) == list(range(first, ITERS + 1))
    for step in losses:
        assert losses[step] == pytest.approx(expected[step], rel=RTOL, abs=0), (step, losses, expected)
    assert expected[ITERS] < expected[1]


def test_sequence_parallel_matches_tp1(tp1_run, tmp_path):
    run_dir = tmp_path / "sp"
    result = torchrun(2, _args(run_dir, "--tensor-model-parallel-size", "2", "--sequence-parallel"))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_losses_match(run_dir, tp1_run)


def test_interleaved_schedule_resumes_tp1_and_matches_it(tp1_run, tmp_path):
    run_dir = tmp_path / "vpp"
    result = torchrun(2, _args(run_dir, "--pipeline-model-parallel-size", "2",
                               "--virtual-pipeline-model-parallel-size", "2",
                               "--load", str(tp1_run / "checkpoints"), "--ckpt-step", "2",
                               "--norm-log-interval", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 model chunks per stage" in result.stdout + result.stderr
    _assert_losses_match(run_dir, tp1_run, first=3)
    name = f"iter_{ITERS:07d}"
    mine = checkpoint_tensors(run_dir / "checkpoints" / name, tmp_path)
    expected = checkpoint_tensors(tp1_run / "checkpoints" / name, tmp_path)
    weights = ("embedding.", "decoder.", "output_layer.", "optimizer.state.")  # not the layout's RNG states
    keys = {k for k in expected if k.startswith(weights)}
    assert keys == {k for k in mine if k.startswith(weights)}
    assert "decoder.layers.mlp.linear_fc1.weight" in keys and "optimizer.state.momentum_buffer.output_layer.weight" in keys
    for key in keys:
        torch.testing.assert_close(mine[key], expected[key], rtol=RTOL, atol=1e-7, msg=key)
    norms, expected_norms = _norms_at(run_dir, ITERS), _norms_at(tp1_run, ITERS)
    assert "decoder.layers.3.self_attention.linear_qkv.weight:q" in expected_norms["params"]
    for kind in ("params", "updates", "weight_changes"):
        assert norms[kind].keys() == expected_norms[kind].keys(), kind
        for matrix, values in expected_norms[kind].items():
            for norm, value in values.items():
                if norm == "sigma_max_rel_bound":  # how close Lanczos came, which depends on its start
                    continue
                assert norms[kind][matrix][norm] == pytest.approx(value, rel=NORM_RTOL, abs=1e-9), (kind, matrix, norm)


def _norms_at(run_dir: Path, step: int) -> dict:
    with open(RunDir(str(run_dir)).norms) as f:
        return next(r for r in map(json.loads, f) if r["step"] == step)


def test_overlap_grad_reduce_matches_tp1(tp1_run, tmp_path):
    run_dir = tmp_path / "overlap"
    result = torchrun(2, _args(run_dir, "--overlap-grad-reduce"))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_losses_match(run_dir, tp1_run)


def _groups_and_overlap_worker(rank: int, world: int) -> None:
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from disco_megatron.builders import build_trainable
    from disco_megatron.config import ModelConfig, RunConfig
    from disco_megatron.optim.distributed import StageGroups
    from disco_megatron.runtime import initialize_parallel
    from disco_megatron.training.step import make_forward_step

    # CP2 x DP1: megatron's DP group is this rank alone, the optimizer's DP (and TP x DP) group both ranks.
    info = initialize_parallel(1, 1, cp=2)
    assert (info.cp, info.dp, info.cp_rank) == (2, 1, rank)
    groups = StageGroups.from_megatron()
    assert dist.get_process_group_ranks(groups.dp) == [0, 1]
    assert dist.get_process_group_ranks(groups.tp_dp) == [0, 1]

    # DP2 with --overlap-grad-reduce: the bucket's all-reduce is in flight when the schedule finalizes.
    initialize_parallel(1, 1)
    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, seq_length=8,
                        vocab_size=128)
    for overlap in (True, False):
        parts = build_trainable(RunConfig(model=model, overlap_grad_reduce=overlap))
        (ddp,) = parts.ddp
        pending = []
        config = parts.model[0].config
        finalize = config.finalize_model_grads_func

        def record_then_finalize(*args, **kwargs):
            pending.append([group.grad_reduce_handle is not None for group in ddp.bucket_groups])
            return finalize(*args, **kwargs)

        config.finalize_model_grads_func = record_then_finalize
        tokens = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(rank))
        batch = {"tokens": tokens, "position_ids": torch.arange(8).unsqueeze(0), "labels": tokens.roll(-1, 1),
                 "loss_mask": torch.ones(1, 8)}
        for _ in range(2):
            ddp.zero_grad_buffer()
            get_forward_backward_func()(forward_step_func=make_forward_step(), data_iterator=iter([batch, batch]),
                                        model=parts.ddp, num_microbatches=2, seq_length=8, micro_batch_size=1)
        buckets = len(ddp.bucket_groups)
        assert pending == [[False] * buckets, [overlap] * buckets], (overlap, pending)
        assert (config.grad_sync_func is not None) == overlap


def test_context_parallel_joins_dp_and_overlap_starts_in_backward():
    run_workers(_groups_and_overlap_worker, 2)


def test_reshard_target_drops_the_layout_features():
    """A reshard rebuilds the run at the target TP x PP: interleaving, CP, SP and overlap of the source
    layout must not follow it (SP at TP1 or VPP at PP1 would be refused)."""
    from disco_megatron.config import RunConfig

    source = RunConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True,
                       virtual_pipeline_model_parallel_size=2, context_parallel_size=2, overlap_grad_reduce=True,
                       lr=0.5)
    target = source.at_layout(1, 1)
    assert (target.tensor_model_parallel_size, target.pipeline_model_parallel_size) == (1, 1)
    assert (target.sequence_parallel, target.virtual_pipeline_model_parallel_size, target.context_parallel_size,
            target.overlap_grad_reduce, target.lr) == (False, None, 1, False, 0.5)
    target.validate_parallel_features(num_microbatches=1)

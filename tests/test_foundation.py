"""Foundation: parallel_state layout, TP/PP model equivalence, training, resume (gloo processes)."""
from __future__ import annotations

import pytest
import torch

from tests._dist import run_workers
from tests._launch import TINY_MODEL, torchrun, train_losses

from disco_megatron.config import ModelConfig

CFG = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
           seq_length=16, vocab_size=256, make_vocab_size_divisible_by=64)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(7))


def _setup(tp: int, pp: int):
    from disco_megatron.runtime import initialize_parallel

    return initialize_parallel(tp, pp, seed=11)


def _teardown() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def _ranks_worker(rank: int, world: int, tp: int, pp: int, out: str) -> None:
    from megatron.core import parallel_state as ps

    info = _setup(tp, pp)
    triples = [None] * world
    torch.distributed.all_gather_object(triples, (info.tp_rank, info.pp_rank, info.dp_rank))
    tp_peers = torch.distributed.get_process_group_ranks(ps.get_tensor_model_parallel_group())
    pp_peers = torch.distributed.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    if rank == 0:
        torch.save({"triples": triples}, out)
    for peer in tp_peers:
        assert triples[peer][1:] == triples[rank][1:], "TP peers must share PP and DP rank"
    for peer in pp_peers:
        assert (triples[peer][0], triples[peer][2]) == (triples[rank][0], triples[rank][2])
    assert len(tp_peers) == tp and len(pp_peers) == pp
    _teardown()


def test_parallel_state_ranks_tp2pp2_and_tp2dp2(tmp_path):
    for tp, pp in ((2, 2), (2, 1)):
        out = tmp_path / f"ranks_{tp}{pp}.pt"
        run_workers(_ranks_worker, 4, tp, pp, str(out))
        triples = torch.load(out)["triples"]
        dp = 4 // (tp * pp)
        assert sorted(triples) == sorted((t, p, d) for t in range(tp) for p in range(pp) for d in range(dp))


def _reference_worker(rank: int, world: int, out: str) -> None:
    """TP1/PP1 model: full weights, full logits, and the loss of a fixed batch."""
    from disco_megatron.models import build_gpt_model

    _setup(1, 1)
    cfg = ModelConfig(**CFG)
    model = build_gpt_model(cfg)
    tokens = _tokens()
    pos = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        logits = model(tokens[:, :-1], pos, None)
        loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).mean()
    torch.save({"weights": {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k},
                "logits": logits, "loss": loss}, out)
    _teardown()


def _tp_logits_worker(rank: int, world: int, ref: str, out: str) -> None:
    from megatron.core import parallel_state as ps

    from disco_megatron.models import build_gpt_model
    from disco_megatron.models.weights import load_full_weights

    _setup(world, 1)
    cfg = ModelConfig(**CFG)
    model = build_gpt_model(cfg)
    load_full_weights(model, torch.load(ref)["weights"], cfg)
    with torch.no_grad():
        local = model(_tokens()[:, :-1], torch.arange(16).expand(2, -1), None)
    parts = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    if rank == 0:
        torch.save(torch.cat(parts, dim=-1), out)
    _teardown()


def _pp_loss_worker(rank: int, world: int, ref: str, out: str) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from disco_megatron.models import build_gpt_model
    from disco_megatron.models.weights import load_full_weights

    info = _setup(2, 2)
    cfg = ModelConfig(**CFG)
    model = build_gpt_model(cfg)
    load_full_weights(model, torch.load(ref)["weights"], cfg)
    tokens = _tokens()
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(16).expand(2, -1)}

    def step(iterator, model):
        b = next(iterator)
        output = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return output, lambda o: (o.mean(), {"loss": o.mean().detach()})

    losses = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=[model],
                                         num_microbatches=1, seq_length=16, micro_batch_size=2, forward_only=True)
    if info.is_last_stage and info.tp_rank == 0:
        torch.save(losses[0]["loss"], out)
    _teardown()


def test_tp2_logits_and_tp2pp2_loss_equal_tp1(tmp_path):
    ref = str(tmp_path / "ref.pt")
    run_workers(_reference_worker, 1, ref)
    reference = torch.load(ref)
    run_workers(_tp_logits_worker, 2, ref, str(tmp_path / "tp2.pt"))
    logits = torch.load(tmp_path / "tp2.pt")
    assert logits.shape == reference["logits"].shape
    assert (logits - reference["logits"]).abs().max().item() <= 1e-5
    run_workers(_pp_loss_worker, 4, ref, str(tmp_path / "pp2.pt"))
    assert abs(torch.load(tmp_path / "pp2.pt").item() - reference["loss"].item()) <= 1e-5


def _train_args(run_dir, iters: int, extra: list[str] = ()) -> list[str]:
    return [*TINY_MODEL, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(iters),
            "--log-interval", "1", "--run-dir", str(run_dir), *extra]


@pytest.mark.parametrize("optimizer,lr", [("adam", "3e-3"), ("scion", "0.02")])
def test_training_loss_falls_and_resume_continues_identically(tmp_path, embedded_data, optimizer, lr):
    """30 steps at TP2xPP2: loss falls; 15 + save + load + 15 repeats steps 16..30 exactly."""
    flags = ["--optimizer", optimizer, "--lr", lr]
    full = tmp_path / "full"
    result = torchrun(4, _train_args(full, 30, [*flags, "--save-interval", "15"]))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = train_losses(full)
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[i] for i in range(1, 4)) / 3, sum(losses[i] for i in range(28, 31)) / 3
    assert last < first - 0.5, (first, last)
    resumed = tmp_path / "resumed"
    result = torchrun(4, _train_args(resumed, 30, [*flags, "--load", str(full / "checkpoints"), "--ckpt-step", "15"]))
    assert result.returncode == 0, result.stderr[-3000:]
    again = train_losses(resumed)
    assert sorted(again) == list(range(16, 31))
    for iteration in range(16, 31):
        assert abs(again[iteration] - losses[iteration]) <= 1e-6, (iteration, again[iteration], losses[iteration])

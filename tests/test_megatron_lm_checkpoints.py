"""Checkpoints that Megatron-LM itself writes, converted: its ``pretrain_gpt.py`` (core_v0.16.1, on CPU
through ``tests/_megatron_lm.py``) makes them here, with the plug-in's Scion.

One module fixture runs Megatron-LM, each run once (the single-process ones side by side):

- ``trained``: TP2, Scion, 6 steps, ``--ckpt-format torch_dist`` saves at steps 3 and 6; beside it
  ``torch_format``: TP2, 1 step, saved with ``--ckpt-format torch``;
- at TP1: ``resumed`` (step 3 resharded to TP1 by ``reshard``, steps 4-6), ``from_hf`` (step 6
  -> ``to-hf`` -> ``from-hf --format megatron-lm``, ``--finetune``, 1 step) and ``original``
  (step 6 itself, ``--finetune``, 1 step);
- ``forward`` (TP2): Megatron-LM's own forward of step 6 and of the ``torch``-format save on fixed
  tokens: ``tests/_megatron_lm_forward.py`` builds the GPT with ``pretrain_gpt.py``'s
  ``model_provider`` and loads with Megatron-LM's ``load_checkpoint``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from _megatron_lm import REPO, needs_megatron_lm, run_pretrain_gpt
from test_megatron_lm_plugin import SCION_RUN

pytestmark = needs_megatron_lm

FORWARD = REPO / "tests" / "_megatron_lm_forward.py"
TOKENS = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))  # NullTokenizer: 127 + EOD
# fp32 throughout. Measured (2 cores): HF logits vs Megatron-LM's <= 7.2e-7 (logits up to 2.8);
# first-step loss from the from-hf checkpoint == the original's exactly; TP1 resume vs the TP2 run
# <= 7.7e-8 relative (one ulp: TP2 sums the fp32 reductions in another order).
LOGITS_ATOL, RESUME_RTOL = 1e-5, 1e-6


def _convert(*argv) -> int:
    from disco_megatron.checkpoint.cli import main

    return main([str(a) for a in argv])


def _megatron_lm(flags: list, nproc: int = 1, **helper) -> None:
    """Megatron-LM's pretrain_gpt.py (or ``helper``'s script) on the tiny Scion run's flags plus ``flags``."""
    result = run_pretrain_gpt(nproc, [*SCION_RUN, "--tensor-model-parallel-size", str(nproc), *map(str, flags)],
                              **helper)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _side_by_side(runs: list[tuple[list, int]]) -> None:
    """Megatron-LM runs (flags, processes) at the same time: each spends most of its time importing."""
    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(lambda run: _megatron_lm(*run), runs))


def _losses(tb: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (tb / "norms.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of every Megatron-LM run and conversion above."""
    d = tmp_path_factory.mktemp("megatron_lm_ckpt")
    _side_by_side([(["--save", d / "trained", "--save-interval", "3", "--tensorboard-dir", d / "trained_tb"], 2),
                   (["--train-iters", "1", "--ckpt-format", "torch", "--save", d / "torch_format",
                     "--save-interval", "1"], 2)])
    assert _convert("reshard", "--load", d / "trained", "--ckpt-step", "3", "--out", d / "tp1",
                    "--target-tp", "1", "--target-pp", "1") == 0
    assert _convert("to-hf", "--load", d / "trained", "--out", d / "hf") == 0
    assert _convert("from-hf", "--hf", d / "hf", "--out", d / "from_hf", "--format", "megatron-lm") == 0
    finetune = ["--finetune", "--train-iters", "1"]
    _side_by_side([(["--load", d / "tp1", "--tensorboard-dir", d / "resumed_tb"], 1),
                   (["--load", d / "from_hf", *finetune, "--tensorboard-dir", d / "from_hf_tb"], 1),
                   (["--load", d / "trained", *finetune, "--tensorboard-dir", d / "original_tb"], 1)])
    torch.save(TOKENS, d / "tokens.pt")
    _megatron_lm([], nproc=2, script=FORWARD, env={  # TP2: Megatron-LM loads torch-format files at their TP only
        "FORWARD_LOADS": os.pathsep.join(str(d / name) for name in ("trained", "torch_format")),
        "FORWARD_TOKENS": str(d / "tokens.pt"), "FORWARD_OUT": str(d / "logits.pt")})
    return d


def _megatron_lm_logits(runs: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron-LM's forward of step 6 (torch_dist) and of the torch-format save."""
    trained, torch_format = torch.load(runs / "logits.pt")
    return trained, torch_format


def _hf_logits(hf_dir: Path) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def _tensors(ckpt: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every global tensor of a torch_dist iteration, read by torch's own DCP reader."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, tmp_path / f"{ckpt.parent.name}.pt")
    return {k: v for k, v in torch.load(tmp_path / f"{ckpt.parent.name}.pt", weights_only=False).items()
            if isinstance(v, torch.Tensor)}


def test_inspect_reads_the_args(runs: Path, capsys: pytest.CaptureFixture) -> None:
    assert _convert("inspect", "--load", runs / "trained") == 0
    text = capsys.readouterr().out
    assert "iteration: 6  consumed samples: 24" in text and "parallel layout: TP 2 x PP 1 x DP 1" in text
    assert "optimizer: ScionOptimizer (Megatron-LM plug-in" in text
    # --vocab-size 127 with NullTokenizer: 128 ids (its EOD is 127), no padding rows at TP 2.
    assert "2 layers, hidden 64, heads 4, query groups 2, ffn 128, vocab 128, RMSNorm, SwiGLU, rope (base 10000), " \
           "untied output" in text
    # Scion state is one global tensor per logical matrix (here --scion-qkv-split qkv: q, k, v)
    assert "optimizer.state.momentum_buffer.decoder.layers.self_attention.linear_qkv.weight:q  (2, 64, 64)" in text


def test_to_hf_logits_equal_megatron_lm_forward(runs: Path) -> None:
    megatron, _ = _megatron_lm_logits(runs)
    hf = _hf_logits(runs / "hf")
    assert hf.shape == megatron.shape == (2, 32, 128)
    assert (hf - megatron).abs().max() <= LOGITS_ATOL


def test_from_hf_for_megatron_lm_finetunes_with_the_original_loss(runs: Path) -> None:
    assert _losses(runs / "from_hf_tb") == _losses(runs / "original_tb")  # one step each, bit for bit


def test_reshard_moves_scion_momentum_and_resumes_the_run(runs: Path, tmp_path: Path) -> None:
    saved = _tensors(runs / "trained" / "iter_0000003", tmp_path)
    moved = _tensors(runs / "tp1" / "iter_0000003", tmp_path)
    assert sum(k.startswith("optimizer.state.momentum_buffer.") for k in saved) == 12  # q, k, v; gate, up
    assert set(moved) == set(saved) and all(torch.equal(moved[k], saved[k]) for k in saved)
    trained, resumed = _losses(runs / "trained_tb"), _losses(runs / "resumed_tb")
    assert len(trained) == 6 and len(resumed) == 3
    assert resumed == pytest.approx(trained[3:], rel=RESUME_RTOL, abs=0)


def test_torch_format_through_legacy_to_hf(runs: Path, tmp_path: Path) -> None:
    assert _convert("legacy", "--load", runs / "torch_format", "--out", tmp_path / "legacy") == 0
    assert _convert("to-hf", "--load", tmp_path / "legacy", "--out", tmp_path / "hf") == 0
    _, megatron = _megatron_lm_logits(runs)
    assert (_hf_logits(tmp_path / "hf") - megatron).abs().max() <= LOGITS_ATOL


def test_scion_state_never_becomes_adam_state(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = shutil.copytree(runs / "trained", tmp_path / "adam_args")
    common = torch.load(ckpt / "iter_0000006" / "common.pt", weights_only=False)
    common["args"].optimizer = "adam"
    torch.save(common, ckpt / "iter_0000006" / "common.pt")
    assert _convert("reshard", "--load", ckpt, "--out", tmp_path / "out", "--target-tp", "1", "--target-pp", "1") == 2
    assert "--optimizer adam but it holds Scion momentum" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,named", [
    ("num_experts", 8, "--num-experts (mixture of experts)"),
    ("multi_latent_attention", True, "--multi-latent-attention (MLA)"),
    ("qk_layernorm", True, "--qk-layernorm"),
    ("position_embedding_type", "mrope", "--position-embedding-type mrope"),
    ("kv_channels", 32, "--kv-channels 32"),
])
def test_unsupported_architecture_is_named(runs: Path, flag: str, value, named: str) -> None:
    from disco_megatron.checkpoint import ConversionError
    from disco_megatron.checkpoint.megatron_lm import model_config_from_args

    args = torch.load(runs / "trained" / "iter_0000006" / "common.pt", weights_only=False)["args"]
    with pytest.raises(ConversionError, match=named.replace("(", r"\(").replace(")", r"\)")):
        model_config_from_args(argparse.Namespace(**{**vars(args), flag: value}), "common.pt")

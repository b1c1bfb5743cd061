"""The Megatron-LM plug-in (disco_megatron.integrations.megatron_lm) on the real megatron-core.

- flags: the Scion table and ``--optimizer scion`` on a parser shaped like Megatron-LM's;
- ``get_megatron_optimizer`` after ``install()``: Scion for a ScionConfig, megatron's own
  optimizer for Adam (real GPTModel in megatron DDP, 2 gloo processes, TP2);
- norm logging in Megatron-LM's step order on a PP2 model (2 processes);
- with the Megatron-LM core_v0.16.1 fixture (``tests/_megatron_lm.py`` finds it; skipped only where
  it is absent): its real parser, and its own ``pretrain_gpt.py`` trained with Scion at TP1 and TP2
  (2 gloo processes), TP2's losses and parameter norms equal to TP1's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist import run_workers
from _megatron_lm import MEGATRON_LM, REPO, needs_megatron_lm, run_pretrain_gpt
from disco_megatron.scion_options import SCION_FLAGS

EXAMPLE = REPO / "examples" / "megatron_lm" / "pretrain_gpt_scion.sh"
# Megatron-LM core_r0.16's --optimizer choices (megatron/training/arguments.py, _add_training_args).
MEGATRON_LM_OPTIMIZERS = ["adam", "sgd", "muon", "dist_muon"]
MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
             seq_length=16, vocab_size=128, make_vocab_size_divisible_by=64)
# Whether this process (and a subprocess with its environment) can import Megatron-LM's training
# package without the fixture folder being put on the path.
MEGATRON_TRAINING_INSTALLED = importlib.util.find_spec("megatron.training") is not None


def megatron_lm_like_parser() -> argparse.ArgumentParser:
    """The Megatron-LM flags the plug-in reads, with ``--optimizer``'s choices as Megatron-LM has them."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    group = parser.add_argument_group("training")
    group.add_argument("--optimizer", type=str, default="adam", choices=list(MEGATRON_LM_OPTIMIZERS))
    group.add_argument("--lr", type=float, default=None)
    group.add_argument("--min-lr", type=float, default=0.0)
    group.add_argument("--weight-decay", type=float, default=0.01)
    group.add_argument("--start-weight-decay", type=float)
    group.add_argument("--end-weight-decay", type=float)
    group.add_argument("--clip-grad", type=float, default=1.0)
    for flag in ("--bf16", "--fp16", "--use-distributed-optimizer", "--log-num-zeros-in-grad",
                 "--barrier-with-L1-time"):
        group.add_argument(flag, action="store_true")
    return parser


def _scion_parser() -> argparse.ArgumentParser:
    from disco_megatron.integrations.megatron_lm import add_scion_args

    return add_scion_args(megatron_lm_like_parser())


def test_parser_gets_every_scion_flag_and_the_scion_choice(capsys) -> None:
    plain = megatron_lm_like_parser()
    with pytest.raises(SystemExit):
        plain.parse_args(["--optimizer", "scion"])  # the stand-in rejects it like Megatron-LM does
    parser = _scion_parser()
    for flag, _, _ in SCION_FLAGS.values():
        assert flag in parser._option_string_actions, flag
    args = parser.parse_args(["--optimizer", "scion", "--lr", "0.03", "--scion-lr-output", "0.01",
                              "--scion-momentum", "0.2", "--scion-radius-output", "7", "--scion-constrained",
                              "--scion-tp-mode", "duplicated", "--scion-qkv-split", "head",
                              "--scion-ns-backend", "polar_express", "--scion-ns-steps", "7",
                              "--scion-output-lmo", "sign", "--scion-weight-decay", "0.05",
                              "--norm-log-interval", "5"])
    assert (args.optimizer, args.scion_lr_output, args.scion_momentum, args.scion_radius_output) == \
        ("scion", 0.01, 0.2, 7.0)
    assert (args.scion_constrained, args.scion_tp_mode, args.scion_qkv_split, args.scion_ns_backend) == \
        (True, "duplicated", "head", "polar_express")
    assert (args.scion_ns_steps, args.scion_output_lmo, args.scion_weight_decay, args.norm_log_interval) == \
        (7, "sign", 0.05, 5)
    assert args.scion_lr_embedding is None and args.scion_dp_mode == "replicated" and args.norm_log_file is None
    assert parser.parse_args(["--optimizer", "adam"]).optimizer == "adam"
    for bad in (["--optimizer", "lion"], ["--scion-tp-mode", "fastest"], ["--scion-qkv-split", "rows"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "invalid choice: 'rows'" in capsys.readouterr().err
    from disco_megatron.integrations.megatron_lm import add_scion_args

    assert add_scion_args(parser) is parser  # idempotent: install() and a script may both add it


def test_scion_config_from_megatron_lm_args() -> None:
    from disco_megatron.optim.config import scion_config_from_args

    parser = _scion_parser()
    args = parser.parse_args(["--optimizer", "scion", "--lr", "0.04", "--min-lr", "0.004", "--bf16",
                              "--scion-lr-output", "0.01", "--scion-lr-embedding", "0.08",
                              "--scion-radius-hidden", "2", "--scion-momentum", "0.3", "--scion-qkv-split", "head"])
    config = scion_config_from_args(args)
    assert [config.group_lr(g) for g in ("embedding", "hidden", "output", "gains")] == [0.08, 0.04, 0.01, 0.04]
    assert config.group_min_lr("output") == pytest.approx(0.001)
    assert (config.group_radius("hidden"), config.scion_momentum, config.scion_qkv_split) == (2.0, 0.3, "head")
    assert config.bf16 and config.params_dtype == torch.bfloat16 and config.clip_grad == 1.0  # Megatron-LM's default
    assert config.scion_dp_mode == "replicated" and not config.use_distributed_optimizer
    # --scion-preset disco (rakkit/disco's example: radius 1 in every group, momentum 0.1); Megatron-LM's
    # --lr, given, sets every group's lr; a Scion flag given with the preset overrides it.
    preset = scion_config_from_args(parser.parse_args(["--optimizer", "scion", "--lr", "0.03", "--scion-preset",
                                                       "disco", "--scion-radius-output", "4"]))
    assert [preset.group_lr(g) for g in ("embedding", "hidden", "output", "gains")] == [0.03] * 4
    assert [preset.group_radius(g) for g in ("embedding", "hidden", "output", "gains")] == [1.0, 1.0, 4.0, 1.0]
    assert (preset.scion_momentum, preset.weight_decay, preset.scion_constrained) == (0.1, 0.0, False)
    with pytest.raises(ValueError, match="--fp16"):
        scion_config_from_args(parser.parse_args(["--optimizer", "scion", "--lr", "0.1", "--fp16"]))
    with pytest.raises(ValueError, match="--clip-grad"):
        scion_config_from_args(parser.parse_args(["--optimizer", "scion", "--lr", "0.1", "--clip-grad", "-1"]))


def test_distributed_optimizer_maps_to_scion_dp_sharded() -> None:
    """--use-distributed-optimizer is accepted: Scion's sharded DP mode, megatron's flag off before DDP."""
    from disco_megatron.integrations.megatron_lm import map_distributed_optimizer
    from disco_megatron.optim.config import scion_config_from_args

    parser = _scion_parser()
    argv = ["--optimizer", "scion", "--lr", "0.1", "--use-distributed-optimizer", "--clip-grad", "1.0"]
    config = scion_config_from_args(parser.parse_args(argv))
    assert (config.scion_dp_mode, config.use_distributed_optimizer, config.clip_grad) == ("sharded", False, 1.0)
    args = parser.parse_args(argv)
    map_distributed_optimizer(args)
    assert (args.scion_dp_mode, args.use_distributed_optimizer) == ("sharded", False)
    adam = parser.parse_args(["--lr", "0.1", "--use-distributed-optimizer"])
    map_distributed_optimizer(adam)
    assert adam.use_distributed_optimizer and adam.scion_dp_mode == "replicated"  # Adam keeps megatron's
    with pytest.raises(ValueError, match="--scion-tp-mode owner"):
        scion_config_from_args(parser.parse_args([*argv, "--scion-tp-mode", "duplicated"]))
    from disco_megatron.optim.config import ScionConfig

    direct = ScionConfig(lr=0.1, use_distributed_optimizer=True, clip_grad=1.0)  # megatron-core users' config
    assert (direct.scion_dp_mode, direct.use_distributed_optimizer, direct.clip_grad) == ("sharded", False, 1.0)


def test_optimizer_config_hook_uses_scion_weight_decay_and_leaves_adam_alone() -> None:
    from disco_megatron.integrations.megatron_lm import _get_megatron_optimizer_config

    calls = []
    hooked = _get_megatron_optimizer_config(lambda args: calls.append(args.optimizer) or ("adam config", {}))
    parser = _scion_parser()
    adam = parser.parse_args(["--lr", "0.1", "--weight-decay", "0.1"])
    assert hooked(adam) == ("adam config", {}) and calls == ["adam"] and adam.weight_decay == 0.1
    scion = parser.parse_args(["--optimizer", "scion", "--lr", "0.1", "--scion-weight-decay", "0.02",
                               "--start-weight-decay", "0.1", "--end-weight-decay", "0.1"])
    config, overrides = hooked(scion)
    assert calls == ["adam"] and overrides is None
    assert config.optimizer == "scion" and config.weight_decay == 0.02
    assert scion.weight_decay == scion.start_weight_decay == scion.end_weight_decay == 0.02


def dispatch_worker(rank: int, world: int) -> None:
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from disco_megatron.config import ModelConfig
    from disco_megatron.integrations import megatron_lm
    from disco_megatron.models import build_gpt_model
    from disco_megatron.optim.config import ScionConfig
    from disco_megatron.optim.megatron import ScionOptimizer
    from disco_megatron.runtime import initialize_parallel

    initialize_parallel(2, 1)
    original = mcore_optimizer.get_megatron_optimizer
    megatron_lm.install()
    megatron_lm.install()
    hooked = mcore_optimizer.get_megatron_optimizer
    assert hooked is not original and hooked.__wrapped__ is original
    model = build_gpt_model(ModelConfig(**MODEL))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    scion = hooked(ScionConfig(lr=0.05, scion_lr_output=0.01), [ddp])
    assert type(scion) is ScionOptimizer
    assert {g["name"]: g["lr"] for g in scion.param_groups} == \
        {"embedding": 0.05, "hidden": 0.05, "output": 0.01, "gains": 0.05}
    adam_config = OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.0)
    adam = hooked(adam_config, [ddp])
    assert type(adam) is type(original(adam_config, [ddp])) and not isinstance(adam, ScionOptimizer)
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(3))
    before = [p.detach().clone() for p in model.parameters()]
    ddp.zero_grad_buffer()
    scion.zero_grad()
    ddp(tokens[:, :-1], torch.arange(16).expand(2, -1), None, labels=tokens[:, 1:]).mean().backward()
    ddp.finish_grad_sync()
    assert scion.step()[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with pytest.raises(TypeError, match="ScionConfig"):
        hooked(OptimizerConfig(optimizer="scion", lr=0.1), [ddp])
    with pytest.raises(ValueError, match="config_overrides"):
        hooked(ScionConfig(lr=0.1), [ddp], config_overrides={"any": "override"})
    megatron_lm.uninstall()
    assert mcore_optimizer.get_megatron_optimizer is original


def test_get_megatron_optimizer_returns_scion_only_for_scion() -> None:
    run_workers(dispatch_worker, 2)


def norm_hook_worker(rank: int, world: int, out: str) -> None:
    """PP2: Megatron-LM's order per iteration: curr_iteration, optimizer.step(), consumed samples, training_log."""
    from megatron.core import parallel_state as ps

    from disco_megatron.config import ModelConfig
    from disco_megatron.integrations.megatron_lm import build_norm_hook
    from disco_megatron.models import build_gpt_model
    from disco_megatron.optim.config import ScionConfig
    from disco_megatron.optim.megatron import get_scion_optimizer
    from disco_megatron.runtime import initialize_parallel

    initialize_parallel(1, 2)
    model = build_gpt_model(ModelConfig(**MODEL))
    opt = get_scion_optimizer(ScionConfig(lr=0.05), [model])
    args = argparse.Namespace(curr_iteration=0, consumed_train_samples=0, seq_length=16, norm_log_interval=2,
                              norm_log_file=None, norm_condition_number=False, tensorboard_dir=None, save=out)
    hook = build_norm_hook([model], opt, args)
    last = ps.is_pipeline_last_stage()
    gen = torch.Generator().manual_seed(11 + rank)
    output_update = None
    for iteration in range(4):
        args.curr_iteration = iteration
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        before = model.output_layer.weight.detach().clone() if last else None
        assert opt.step()[0]
        if last:
            output_update = float((model.output_layer.weight.detach() - before).norm())
        args.consumed_train_samples += 4
        hook.after_log(iteration + 1, {"lm loss": torch.tensor(10.0 - iteration)} if last else {})
    if last:
        torch.save({"output_update": output_update}, Path(out) / "expected.pt")


def test_norm_hook_in_megatron_lm_step_order(tmp_path: Path) -> None:
    run_workers(norm_hook_worker, 2, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "norms.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert [r["tokens"] for r in records] == [2 * 4 * 16, 4 * 4 * 16]
    assert [r["loss"] for r in records] == [9.0, 7.0]
    assert records[0]["lr"] == {"embedding": 0.05, "hidden": 0.05, "output": 0.05, "gains": 0.05}
    layers = {name.split(".")[2] for name in records[1]["params"] if name.startswith("decoder.layers.")}
    assert layers == {"0", "1", "2", "3"}  # stage 1's local layers 0-1 are global layers 2-3
    assert {"embedding.word_embeddings.weight", "output_layer.weight"} <= set(records[1]["updates"])
    expected = torch.load(tmp_path / "expected.pt")["output_update"]
    assert records[1]["weight_changes"]["output_layer.weight"]["frobenius"] == pytest.approx(expected, rel=1e-5)
    # Unconstrained Scion without weight decay: the optimizer's step is the weight change (fp32 rounding).
    assert records[1]["updates"]["output_layer.weight"]["frobenius"] == pytest.approx(expected, rel=1e-5)


def _dry_run_flags(tmp_path: Path) -> list[str]:
    (tmp_path / "pretrain_gpt.py").write_text("")
    env = dict(os.environ, DRY_RUN="1", MEGATRON_LM=str(tmp_path), NPROC_PER_NODE="2")
    result = subprocess.run(["bash", str(EXAMPLE), "--seed", "7"], env=env, capture_output=True, text=True,
                            timeout=60, check=True)
    tokens = shlex.split(result.stdout)
    i = tokens.index("-m")
    assert tokens[i + 1:i + 3] == ["disco_megatron.integrations.megatron_lm", str(tmp_path / "pretrain_gpt.py")]
    return tokens[i + 3:]


def test_example_script_flags_parse(tmp_path: Path) -> None:
    args, _ = _scion_parser().parse_known_args(_dry_run_flags(tmp_path))
    assert (args.optimizer, args.scion_lr_output, args.scion_qkv_split, args.norm_log_interval) == \
        ("scion", 0.005, "qkv", 10)


def test_runner_refuses_bad_input(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "disco_megatron.integrations.megatron_lm", *args],
                              capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))

    missing = run(str(tmp_path / "pretrain_gpt.py"), "--optimizer", "scion")
    assert missing.returncode == 2 and "PRETRAIN_SCRIPT.py" in missing.stderr
    if not MEGATRON_TRAINING_INSTALLED:
        script = tmp_path / "pretrain_gpt.py"
        script.write_text("raise SystemExit('must not run')\n")
        result = run(str(script))
        assert result.returncode == 2 and "megatron.training is not importable" in result.stderr


@needs_megatron_lm
def test_megatron_lm_parser_accepts_the_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(MEGATRON_LM))
    from megatron.training import arguments

    from disco_megatron.integrations import megatron_lm

    megatron_lm.install()
    try:
        parser = arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
        args = parser.parse_args(_dry_run_flags(tmp_path))
    finally:
        megatron_lm.uninstall()
    assert (args.optimizer, args.scion_lr_output, args.seed, args.transformer_impl) == \
        ("scion", 0.005, 7, "transformer_engine")


SCION_RUN = ["--transformer-impl", "local", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
             "--num-query-groups", "2", "--group-query-attention", "--ffn-hidden-size", "128", "--seq-length", "32",
             "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--train-iters", "6", "--lr", "0.02", "--lr-decay-style", "constant", "--optimizer", "scion",
             "--scion-qkv-split", "qkv", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
             "--make-vocab-size-divisible-by", "64", "--seed", "1234", "--hidden-dropout", "0",
             "--attention-dropout", "0", "--log-interval", "1", "--norm-log-interval", "1",
             "--eval-iters", "0", "--eval-interval", "1000", "--no-gradient-accumulation-fusion",
             "--disable-bias-linear", "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
             "--untie-embeddings-and-output-weights", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
             "--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-persist-layer-norm", "--rerun-mode", "disabled"]
# TP2 against TP1 with the same seed, data and full initial weights and dropout 0: TP only changes
# the order of the fp32 reductions. Measured over the 6 steps (2 cores, gloo): losses at most 7.6e-8
# apart relative (one fp32 ulp, at step 5), parameter Frobenius norms at most 1.6e-7.
TP_RTOL = 1e-6


@pytest.fixture(scope="module")
def scion_run(tmp_path_factory: pytest.TempPathFactory):
    """``scion_run(tp)``: (run directory, stdout) of Megatron-LM's pretrain_gpt.py with Scion on TP ``tp``
    processes (each TP size runs once per module)."""
    runs: dict[int, tuple[Path, str]] = {}

    def run(tp: int) -> tuple[Path, str]:
        if tp not in runs:
            out = tmp_path_factory.mktemp(f"megatron_lm_tp{tp}")
            result = run_pretrain_gpt(tp, [*SCION_RUN, "--tensor-model-parallel-size", str(tp),
                                           "--tensorboard-dir", str(out / "tb"), "--save", str(out / "ckpt"),
                                           "--save-interval", "6"])
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
            runs[tp] = out, result.stdout
        return runs[tp]

    return run


def _norm_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "tb" / "norms.jsonl").read_text().splitlines()]


def _losses_and_weight_norms(run_dir: Path) -> list[float]:
    """Each logged step's loss, then the Frobenius norm of every parameter after it."""
    return [value for r in _norm_records(run_dir)
            for value in (r["loss"], *(norms["frobenius"] for norms in r["params"].values()))]


@needs_megatron_lm
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_lm_pretrain_gpt_trains_with_scion(scion_run, tp: int) -> None:
    run_dir, stdout = scion_run(tp)
    assert f"world size: {tp}, data-parallel size: 1" in stdout and f"tensor-model-parallel size: {tp}," in stdout
    records = _norm_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert set(records[0]["lr"]) == {"embedding", "hidden", "output", "gains"}  # Scion's groups, not Adam's
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(v is not None for r in records for norms in r["updates"].values() for v in norms.values())
    assert (run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


@needs_megatron_lm
def test_megatron_lm_scion_losses_and_weights_at_tp2_equal_tp1(scion_run) -> None:
    tp1, tp2 = (_losses_and_weight_norms(scion_run(tp)[0]) for tp in (1, 2))
    matrices = len(_norm_records(scion_run(1)[0])[0]["params"])  # 15 parameters, q/k/v and gate/up apart
    assert matrices == 21 and len(tp1) == len(tp2) == 6 * (1 + matrices)  # 6 steps x (loss + each matrix)
    assert tp2 == pytest.approx(tp1, rel=TP_RTOL, abs=0)


@needs_megatron_lm
def test_megatron_lm_norms_equal_the_reference(scion_run, tmp_path: Path) -> None:
    """The plug-in's last record (TP2) against the reference's formulas on the checkpoint exported to HF."""
    from safetensors.torch import load_file

    from _reference_norms import compare_norms, hf_matrix, hf_name
    from disco_megatron.checkpoint.cli import main as convert

    run_dir, _ = scion_run(2)
    assert convert(["to-hf", "--load", str(run_dir / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    record = _norm_records(run_dir)[-1]
    assert record["step"] == 6
    for key, got in record["params"].items():
        compare_norms(got, hf_matrix(weights, key), f"param {key}")
    assert {hf_name(key) for key in record["params"]} == set(weights)

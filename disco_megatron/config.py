"""Run configuration: dataclasses plus the command line, with Megatron-LM flag names.

The parser is the one place that knows every flag; ``parse_run_config`` turns argv into a
validated :class:`RunConfig`, raising :class:`ConfigError` with a message that names the flag.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Sequence

from disco_megatron import scion_options
from disco_megatron.scion_options import ScionFlags


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Embedding rows: ``vocab_size`` rounded up to a multiple of ``divisible_by * tp_size``.

    Megatron-LM's rule (``--make-vocab-size-divisible-by``), so every TP shard of the embedding
    has the same, aligned number of rows.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size}: must be positive")
    if divisible_by <= 0:
        raise ValueError(f"--make-vocab-size-divisible-by {divisible_by}: must be positive")
    if tp_size <= 0:
        raise ValueError(f"--tensor-model-parallel-size {tp_size}: must be positive")
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


# Exit code of a run that a SIGUSR1/SIGTERM stopped after it saved a checkpoint (sysexits' EX_TEMPFAIL:
# "try again later"); 2 is a bad input, 1 a crash.
PREEMPTED_EXIT_CODE = 75


class ConfigError(ValueError):
    """Invalid flags; the message names the flag and the fix."""


def validate_world(world_size: int, tp: int, pp: int, cp: int = 1) -> int:
    """Return DP size, or raise a message naming the flags when the world cannot be split."""
    if tp < 1 or pp < 1 or cp < 1:
        raise ConfigError(
            f"--tensor-model-parallel-size ({tp}), --pipeline-model-parallel-size ({pp}) and "
            f"--context-parallel-size ({cp}) must be >= 1"
        )
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}; launch a multiple of "
            f"{tp * pp * cp} processes (torchrun --nproc-per-node) or change the sizes"
        )
    return world_size // (tp * pp * cp)


class _Entry:
    """One thing a run directory holds: ``RunDir.norms.name`` is its name, ``RunDir(path).norms`` its path."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, run_dir: Optional["RunDir"], owner: type) -> Any:
        return self if run_dir is None else os.path.join(run_dir.path, self.name)


@dataclass(frozen=True)
class RunDir:
    """One ``--run-dir`` and the names of what it holds, written here only.

    The trainer writes the first five, ``disco_megatron.launcher`` the launch record and log;
    the converter, the sweeps, the benchmarks and the tools find them through this type.
    """

    path: str
    checkpoints = _Entry("checkpoints")  # the default --save
    tensorboard = _Entry("tensorboard")  # the default --tensorboard-dir
    train_log = _Entry("train_log.jsonl")
    norms = _Entry("norms.jsonl")
    run_config = _Entry("run_config.json")
    launch_record = _Entry("launch.json")
    launch_log = _Entry("launch.log")

    @classmethod
    def names(cls) -> frozenset[str]:
        """Every name a run directory may hold (anything else there is not a run's)."""
        return frozenset(e.name for e in vars(cls).values() if isinstance(e, _Entry))


@dataclass
class ModelConfig:
    """Shape of the GPT (Llama-style by default: RMSNorm, SwiGLU, RoPE, untied, no biases)."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None
    vocab_size: int = 4096
    make_vocab_size_divisible_by: int = 128
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = True
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    untie_embeddings_and_output_weights: bool = True
    add_bias_linear: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: str = "local"
    bf16: bool = False
    fp8_format: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_param_gather: bool = False

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return 4 * self.hidden_size

    def padded_vocab_size(self, tp: int) -> int:
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp)

    def validate(self, tp: int, pp: int) -> None:
        checks = [
            (self.num_attention_heads % tp == 0,
             f"--num-attention-heads {self.num_attention_heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}"),
            (self.query_groups % tp == 0,
             f"--num-query-groups {self.query_groups} is not divisible by --tensor-model-parallel-size {tp}"),
            (self.num_attention_heads % self.query_groups == 0,
             f"--num-attention-heads {self.num_attention_heads} is not divisible by "
             f"--num-query-groups {self.query_groups}"),
            (self.hidden_size % self.num_attention_heads == 0,
             f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
             f"{self.num_attention_heads}"),
            (self.ffn_size % tp == 0,
             f"--ffn-hidden-size {self.ffn_size} is not divisible by --tensor-model-parallel-size {tp}"),
            (self.num_layers % pp == 0,
             f"--num-layers {self.num_layers} is not divisible by --pipeline-model-parallel-size {pp}"),
            (self.normalization in ("RMSNorm", "LayerNorm"),
             f"--normalization {self.normalization}: choose RMSNorm or LayerNorm"),
            (self.transformer_impl in ("local", "transformer_engine"),
             f"--transformer-impl {self.transformer_impl}: choose local or transformer_engine"),
            (self.fp8_format is None or self.transformer_impl == "transformer_engine",
             "--fp8-format needs --transformer-impl transformer_engine"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


# --init-method: what each choice draws is models/init.py; left unset, the optimizer picks it.
INIT_METHODS: tuple[str, ...] = ("scion", "megatron")
INIT_METHOD_OF_OPTIMIZER = {"scion": "scion", "adam": "megatron"}
INIT_METHOD_HELP = (
    "weight init, the same full weights at every TP x PP x DP for one --seed. scion: the Scion paper's "
    "inits (Pethick et al. 2025, arXiv:2502.07529) as rakkit/disco, the reference code of arXiv:2510.03871, "
    "draws them (disco/orthognal_init.py): hidden matrices scaled_orthogonal (every singular value sqrt(d_out/d_in), Q/K/V "
    "and gate/up each), embedding scion_normal_input (rows RMS 1), output scion_normal_output (rows l2 "
    "1/sqrt(d_in)) or, with --scion-output-lmo sign, random +-1/d_in (LIONS-EPFL/scion Sign.init); megatron: "
    "N(0, --init-method-std), linear_proj/linear_fc2 divided by sqrt(2 x layers) (megatron-core's "
    "init_method_normal / scaled_init_method_normal). Both: norm weights ones, biases zero. "
    "(default: scion with --optimizer scion, megatron with adam)")

# RunConfig fields that describe how a layout runs, not what it holds (see RunConfig.at_layout).
LAYOUT_FEATURES = ("virtual_pipeline_model_parallel_size", "context_parallel_size", "sequence_parallel",
                   "overlap_grad_reduce", "overlap_param_gather")


@dataclass
class RunConfig:
    """Everything a pretraining run needs, resolved from flags."""

    model: ModelConfig = field(default_factory=ModelConfig)
    scion: ScionFlags = field(default_factory=ScionFlags)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    micro_batch_size: int = 4
    global_batch_size: int = 8
    train_iters: int = 100
    optimizer: str = "scion"
    lr: float = 0.02
    min_lr: float = 0.0
    lr_decay_style: str = "constant"
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = scion_options.CLIP_GRAD_DEFAULT
    seed: int = 1234
    init_method: Optional[str] = None  # resolved from --optimizer in __post_init__
    data_path: Optional[str] = None
    tokenizer_model: Optional[str] = None
    split: str = "98,2,0"
    data_cache_path: Optional[str] = None
    run_dir: Optional[str] = None
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    ckpt_step: Optional[int] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    tensorboard_dir: Optional[str] = None
    log_interval: int = 10
    eval_interval: Optional[int] = None
    eval_iters: int = 5
    norm_log_interval: int = 10
    norm_log_file: Optional[str] = None
    norm_condition_number: bool = False
    max_skipped_steps: int = 5
    distributed_timeout_minutes: int = 5

    def __post_init__(self) -> None:
        if self.init_method is None:  # resolved once here, so run_config.json records the choice
            self.init_method = INIT_METHOD_OF_OPTIMIZER.get(self.optimizer)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """The inverse of :meth:`to_dict` (a run's ``run_config.json``); TypeError on unknown fields."""
        return cls(**{**data, "model": ModelConfig(**data["model"]), "scion": ScionFlags(**data["scion"])})

    def at_layout(self, tp: int, pp: int) -> "RunConfig":
        """This run at TP x PP without the parallel features of its own layout (a reshard's target): the
        checkpoint files do not depend on them, and they may not fit the new layout."""
        plain = RunConfig()
        return replace(self, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       **{name: getattr(plain, name) for name in LAYOUT_FEATURES})

    def num_microbatches(self, dp: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp)

    def validate(self, world_size: int) -> int:
        """Check the flags against the world and the paths they name for existence; return DP size.

        The contents of ``--data-path`` and of ``--load`` are checked by the entry point
        (``disco_megatron.train``), which knows the dataset and checkpoint formats.
        """
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        dp = validate_world(world_size, tp, pp, self.context_parallel_size)
        self.model.validate(tp, pp)
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {dp}"
            )
        self.validate_parallel_features(self.num_microbatches(dp))
        positive = {"--lr": self.lr, "--train-iters": self.train_iters, "--micro-batch-size": self.micro_batch_size,
                    "--global-batch-size": self.global_batch_size, "--log-interval": self.log_interval,
                    "--norm-log-interval": self.norm_log_interval, "--max-skipped-steps": self.max_skipped_steps,
                    "--distributed-timeout-minutes": self.distributed_timeout_minutes,
                    "--save-interval": self.save_interval, "--eval-interval": self.eval_interval,
                    "--eval-iters": self.eval_iters}
        for flag, value in positive.items():
            if value is not None and not 0 < value < math.inf:  # `not` also rejects NaN
                raise ConfigError(f"{flag} must be a finite number > 0 (got {value})")
        if not 0 <= self.min_lr < math.inf:
            raise ConfigError(f"--min-lr must be a finite number >= 0 (got {self.min_lr})")
        try:
            scion_options.validate(self.scion)
            scion_options.check_clip_grad(self.clip_grad)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.data_path is not None and self.tokenizer_model is None:
            raise ConfigError("--data-path needs --tokenizer-model (the sentencepiece model it was tokenized with)")
        if self.tokenizer_model is not None and self.data_path is None:
            raise ConfigError("--tokenizer-model needs --data-path (data tokenized with it); without --data-path "
                              "the embedded corpus trains its own tokenizer of --vocab-size pieces")
        for flag, path in (("--tokenizer-model", self.tokenizer_model), ("--load", self.load)):
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"{flag} {path}: no such file or directory")
        if self.load is not None and not os.path.isdir(self.load):
            raise ConfigError(f"--load {self.load}: not a directory; pass a checkpoint directory (a run's --save)")
        if self.ckpt_step is not None and self.load is None:
            raise ConfigError(f"--ckpt-step {self.ckpt_step} needs --load (the checkpoint directory to load from)")
        return dp

    def validate_parallel_features(self, num_microbatches: int) -> None:
        """Sequence parallel, the interleaved schedule, context parallel and DDP overlap, as Megatron-LM
        checks them (it needs a GPU for CP: TransformerEngine's attention is the only one that splits it)."""
        tp, pp, cp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size
        seq, vpp = self.model.seq_length, self.virtual_pipeline_model_parallel_size
        if self.sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the "
                              "sequence over the TP ranks); drop the flag or raise TP")
        if self.sequence_parallel and seq % tp:
            raise ConfigError(f"--sequence-parallel: --seq-length {seq} is not divisible by "
                              f"--tensor-model-parallel-size {tp}")
        if vpp is not None:
            if vpp < 1:
                raise ConfigError(f"--virtual-pipeline-model-parallel-size must be >= 1 (got {vpp})")
            if pp == 1:
                raise ConfigError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size "
                                  "> 1 (the interleaved schedule splits each stage into chunks)")
            if self.model.num_layers % (pp * vpp):
                raise ConfigError(f"--num-layers {self.model.num_layers} is not divisible by "
                                  f"--pipeline-model-parallel-size {pp} x --virtual-pipeline-model-parallel-size "
                                  f"{vpp}; every model chunk needs the same number of layers")
            if num_microbatches % pp:
                raise ConfigError(f"--virtual-pipeline-model-parallel-size: the interleaved schedule needs the "
                                  f"number of microbatches ({num_microbatches} = --global-batch-size / "
                                  f"(--micro-batch-size x DP)) to be a multiple of --pipeline-model-parallel-size "
                                  f"{pp}")
        if cp > 1:
            if self.model.transformer_impl != "transformer_engine":
                raise ConfigError(f"--context-parallel-size {cp} needs --transformer-impl transformer_engine "
                                  "(TransformerEngine's attention splits the sequence over CP ranks; it needs a "
                                  "CUDA GPU); the local spec runs CP 1 only")
            if seq % (2 * cp * (tp if self.sequence_parallel else 1)):
                raise ConfigError(f"--context-parallel-size {cp}: --seq-length {seq} must be divisible by 2 x CP"
                                  f"{' x TP (--sequence-parallel)' if self.sequence_parallel else ''}")
        if self.overlap_param_gather:
            raise ConfigError("--overlap-param-gather overlaps megatron's all-gather of a DP-sharded Adam "
                              "(--use-distributed-optimizer); disco-pretrain's DDP keeps whole parameters on "
                              "every DP rank, so there is nothing to gather: drop the flag")


MODEL_FLAGS = {
    "num_layers": ("--num-layers", int, "number of transformer layers"),
    "hidden_size": ("--hidden-size", int, "model width"),
    "num_attention_heads": ("--num-attention-heads", int, "attention heads"),
    "num_query_groups": ("--num-query-groups", int, "GQA key/value groups (default: = heads, i.e. MHA)"),
    "ffn_hidden_size": ("--ffn-hidden-size", int, "MLP width (default 4 x hidden)"),
    "seq_length": ("--seq-length", int, "training sequence length in tokens"),
    "max_position_embeddings": ("--max-position-embeddings", int, "max positions (default: seq length)"),
    "vocab_size": ("--vocab-size", int, "sentencepiece vocab size of the embedded tokenizer (ignored with --tokenizer-model)"),
    "make_vocab_size_divisible_by": ("--make-vocab-size-divisible-by", int, "pad vocab to a multiple of this x TP"),
    "normalization": ("--normalization", str, "RMSNorm or LayerNorm"),
    "norm_epsilon": ("--norm-epsilon", float, "normalisation epsilon"),
    "position_embedding_type": ("--position-embedding-type", str, "rope or learned_absolute"),
    "rotary_base": ("--rotary-base", int, "RoPE base"),
    "init_method_std": ("--init-method-std", float, "std of --init-method megatron's normal init"),
    "hidden_dropout": ("--hidden-dropout", float, "dropout after attention/MLP"),
    "attention_dropout": ("--attention-dropout", float, "dropout on attention probabilities"),
    "transformer_impl": ("--transformer-impl", str, "local (plain PyTorch, CPU) or transformer_engine (GPU, FP8)"),
    "fp8_format": ("--fp8-format", str, "e4m3 or hybrid; enables FP8 (TransformerEngine only)"),
    "fp8_recipe": ("--fp8-recipe", str, "delayed, tensorwise, mxfp8 or blockwise (what the installed TE supports)"),
}

RUN_FLAGS = {
    "tensor_model_parallel_size": ("--tensor-model-parallel-size", int, "TP size"),
    "pipeline_model_parallel_size": ("--pipeline-model-parallel-size", int, "PP size (DP = world / (TP x PP x CP))"),
    "virtual_pipeline_model_parallel_size": (
        "--virtual-pipeline-model-parallel-size", int,
        "model chunks per pipeline stage: megatron's interleaved 1F1B schedule (needs PP > 1, --num-layers "
        "divisible by PP x this, microbatches a multiple of PP)"),
    "context_parallel_size": ("--context-parallel-size", int,
                              "CP size: the sequence split over CP ranks, which join DP for the optimizer "
                              "(needs --transformer-impl transformer_engine, i.e. a GPU)"),
    "micro_batch_size": ("--micro-batch-size", int, "sequences per microbatch per DP rank"),
    "global_batch_size": ("--global-batch-size", int, "sequences per optimizer step over all DP ranks"),
    "train_iters": ("--train-iters", int, "optimizer steps to train"),
    "optimizer": ("--optimizer", str, "scion (default) or adam (megatron-core AdamW baseline)"),
    "lr": ("--lr", float, "peak learning rate (Scion: default for every group without its own --scion-lr-*)"),
    "min_lr": ("--min-lr", float, "learning rate at the end of decay"),
    "lr_decay_style": ("--lr-decay-style", str, "constant, linear, cosine, inverse-square-root or WSD"),
    "lr_warmup_iters": ("--lr-warmup-iters", int, "linear warmup steps"),
    "lr_decay_iters": ("--lr-decay-iters", int, "steps over which lr decays (default --train-iters)"),
    "weight_decay": ("--weight-decay", float, "AdamW weight decay (Scion uses --scion-weight-decay)"),
    "adam_beta1": ("--adam-beta1", float, "Adam beta1"),
    "adam_beta2": ("--adam-beta2", float, "Adam beta2"),
    "adam_eps": ("--adam-eps", float, "Adam epsilon"),
    "clip_grad": ("--clip-grad", float, scion_options.CLIP_GRAD_HELP),
    "seed": ("--seed", int, "random seed (init, data order, dropout)"),
    "data_path": ("--data-path", str, "prefix of an indexed dataset (.bin/.idx); default: the embedded corpus"),
    "tokenizer_model": ("--tokenizer-model", str, "sentencepiece .model of --data-path; default: trained on the embedded corpus"),
    "split": ("--split", str, "train,valid,test document split weights"),
    "data_cache_path": ("--data-cache-path", str, "where dataset indices and the embedded corpus are cached"),
    "run_dir": ("--run-dir", str, "one directory for checkpoints, TensorBoard, logs and norms.jsonl"),
    "save": ("--save", str, "checkpoint directory (default RUN_DIR/checkpoints)"),
    "load": ("--load", str, "checkpoint directory to resume from (its 'latest' iteration)"),
    "ckpt_step": ("--ckpt-step", int, "with --load: load this iteration instead of the latest"),
    "save_interval": ("--save-interval", int, "steps between checkpoints (a final one is always written)"),
    "tensorboard_dir": ("--tensorboard-dir", str, "TensorBoard directory (default RUN_DIR/tensorboard)"),
    "log_interval": ("--log-interval", int, "steps between log lines"),
    "eval_interval": ("--eval-interval", int, "steps between validation losses (default: off)"),
    "eval_iters": ("--eval-iters", int, "validation batches per evaluation"),
    "norm_log_interval": ("--norm-log-interval", int, "steps between norm statistics"),
    "norm_log_file": ("--norm-log-file", str, "norms.jsonl path (default: RUN_DIR/norms.jsonl, else "
                      "TENSORBOARD_DIR/norms.jsonl, else SAVE/norms.jsonl)"),
    "max_skipped_steps": ("--max-skipped-steps", int, "stop after this many non-finite steps in a row"),
    "distributed_timeout_minutes": ("--distributed-timeout-minutes", int, "collective timeout; a dead rank ends the run after it"),
}

def add_flags(group: argparse._ArgumentGroup, table: dict, defaults: object, prefix: str) -> None:
    for name, (flag, typ, text) in table.items():
        default = getattr(defaults, name)
        group.add_argument(flag, dest=prefix + name, type=typ, default=default, metavar=name.upper(),
                           help=f"{text} (default: {default})")


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, on every rank) instead of printing usage and exiting."""

    def error(self, message: str) -> None:
        raise ConfigError(f"{message} (see disco-pretrain --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``disco-pretrain`` (Megatron-LM flag names where Megatron has them)."""
    parser = _Parser(
        prog="disco-pretrain",
        description="Pretrain a GPT with megatron-core and the distributed Scion optimizer. "
        "Launch with torchrun; world size = TP x PP x CP x DP.",
        epilog=f"Exit codes: 0 done; 2 bad flags or files (one error line per rank); {PREEMPTED_EXIT_CODE} "
        "stopped by SIGUSR1 or SIGTERM (Slurm --signal, or forwarded by torchrun): every rank finished the "
        "step in progress and the checkpoint was saved to --save, resume with --load; 1 any other failure.",
    )
    parser.add_argument("--config", metavar="RUN_CONFIG_JSON",
                        help=f"repeat a run: the flags recorded in its {RunDir.run_config.name}, then the flags "
                        "given here; a new --run-dir also moves the checkpoints and TensorBoard it implied")
    run_defaults, model_defaults = RunConfig(), ModelConfig()
    model = parser.add_argument_group("model")
    add_flags(model, MODEL_FLAGS, model_defaults, "model.")
    model.add_argument("--group-query-attention", action="store_true",
                       help="accepted for Megatron-LM compatibility; GQA is on when --num-query-groups < heads")
    model.add_argument("--no-swiglu", dest="model.swiglu", action="store_false", default=True,
                       help="plain GeLU MLP instead of SwiGLU")
    model.add_argument("--swiglu", dest="model.swiglu", action="store_true", help="SwiGLU MLP (default)")
    model.add_argument("--tie-embeddings-and-output-weights", dest="model.untie_embeddings_and_output_weights",
                       action="store_false", default=True, help="share embedding and output weights")
    model.add_argument("--untie-embeddings-and-output-weights", dest="model.untie_embeddings_and_output_weights",
                       action="store_true", help="separate output layer (default; Scion treats it as its own group)")
    model.add_argument("--add-bias-linear", dest="model.add_bias_linear", action="store_true", default=False,
                       help="biases in linear layers (default: none, Llama-style)")
    model.add_argument("--disable-bias-linear", dest="model.add_bias_linear", action="store_false",
                       help="no biases in linear layers (default)")
    model.add_argument("--bf16", dest="model.bf16", action="store_true", default=False,
                       help="bf16 model weights; optimizers keep fp32 master weights")
    model.add_argument("--fp8-param-gather", dest="model.fp8_param_gather", action="store_true", default=False,
                       help="keep FP8 model weights (TransformerEngine), refreshed from fp32 masters")
    run = parser.add_argument_group("run")
    add_flags(run, RUN_FLAGS, run_defaults, "")
    run.add_argument("--init-method", default=None, metavar="{" + ",".join(INIT_METHODS) + "}", help=INIT_METHOD_HELP)
    run.add_argument("--norm-condition-number", action="store_true",
                     help="log each matrix's condition number (an exact SVD per matrix per logging step)")
    run.add_argument("--sequence-parallel", action="store_true",
                     help="split layernorm/dropout activations along the sequence over the TP ranks "
                     "(megatron sequence parallel; needs TP > 1)")
    run.add_argument("--overlap-grad-reduce", action="store_true",
                     help="megatron DDP all-reduces gradient buckets during the backward pass")
    run.add_argument("--overlap-param-gather", action="store_true",
                     help="refused: only megatron's DP-sharded Adam gathers parameters (see the error)")
    run.add_argument("--no-load-optim", action="store_true", help="with --load: do not load optimizer state")
    run.add_argument("--no-load-rng", action="store_true", help="with --load: do not load RNG state")
    scion = parser.add_argument_group("scion", "distributed Scion (--optimizer scion)")
    scion_options.add_scion_arguments(scion, "scion.", argparse_choices=False)
    return parser


CHOICES = {
    "optimizer": ("--optimizer", ("scion", "adam")),
    "init_method": ("--init-method", (None, *INIT_METHODS)),
    "lr_decay_style": ("--lr-decay-style", ("constant", "linear", "cosine", "inverse-square-root", "WSD")),
    "model.position_embedding_type": ("--position-embedding-type", ("rope", "learned_absolute")),
    "model.fp8_format": ("--fp8-format", (None, "e4m3", "hybrid")),
    "model.fp8_recipe": ("--fp8-recipe", ("delayed", "tensorwise", "mxfp8", "blockwise")),
}


def recorded_flags(path: str) -> dict[str, Any]:
    """Parser defaults from a run's ``run_config.json`` (``--config``): every flag it recorded, except
    what was derived from the run rather than given: ``--save``/``--tensorboard-dir`` inside its run
    dir (derived again from the ``--run-dir`` in force), the embedded corpus's tokenizer and an
    ``--init-method`` equal to its optimizer's default."""
    try:
        with open(path) as f:
            cfg = RunConfig.from_dict(json.load(f))
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror}); pass a run's "
                          f"{RunDir.run_config.name}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--config {path}: not a disco-pretrain {RunDir.run_config.name} ({exc})") from None
    if cfg.run_dir:
        implied = RunDir(cfg.run_dir)
        cfg.save = None if cfg.save == implied.checkpoints else cfg.save
        cfg.tensorboard_dir = None if cfg.tensorboard_dir == implied.tensorboard else cfg.tensorboard_dir
    if cfg.data_path is None:
        cfg.tokenizer_model = None  # the embedded corpus's, recorded by the run: it trains its own
    if cfg.init_method == INIT_METHOD_OF_OPTIMIZER.get(cfg.optimizer):
        cfg.init_method = None  # the optimizer's default: derived again from the --optimizer in force
    values = {k: v for k, v in cfg.to_dict().items() if k not in ("model", "scion")}
    values.update({f"model.{k}": v for k, v in asdict(cfg.model).items()})
    values.update({f"scion.{k}": v for k, v in asdict(cfg.scion).items()})
    return values


def parse_run_config(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """Parse flags (after those of ``--config``) into a RunConfig; unknown flags and bad choices raise ConfigError."""
    parser = build_parser()
    namespace, _ = parser.parse_known_args(argv)
    if namespace.config is not None:
        parser.set_defaults(**recorded_flags(namespace.config))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown flag(s): {' '.join(unknown)} (see disco-pretrain --help)")
    values = vars(namespace)
    for key, (flag, allowed) in CHOICES.items():
        if values.get(key) not in allowed:
            shown = ", ".join(a for a in allowed if a is not None)
            raise ConfigError(f"{flag} {values.get(key)}: choose one of {shown}")
    model = ModelConfig(**{k[6:]: v for k, v in values.items() if k.startswith("model.")})
    lr_given = scion_options.flag_given(sys.argv[1:] if argv is None else argv, "--lr")
    scion = scion_options.flags_from_values(values, "scion.", lr_given)
    run_values = {k: v for k, v in values.items() if "." not in k and k in RunConfig.__dataclass_fields__}
    cfg = RunConfig(model=model, scion=scion, **run_values)
    if cfg.run_dir:
        cfg.save = cfg.save or RunDir(cfg.run_dir).checkpoints
        cfg.tensorboard_dir = cfg.tensorboard_dir or RunDir(cfg.run_dir).tensorboard
    return cfg

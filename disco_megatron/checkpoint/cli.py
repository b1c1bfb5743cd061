"""``disco-convert`` / ``tools/convert_checkpoint.py``: checkpoint conversion command line.

Conversions run on CPU (gloo), so they need no GPU and give the same bits everywhere. Bad input
ends with one ``disco-convert: error:`` line naming the flag or file, exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disco-convert",
        description="Convert disco_megatron and Megatron-LM checkpoints: to/from HuggingFace Llama, between TP/PP "
                    "layouts, from Megatron-LM legacy torch checkpoints; inspect one.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text)

    def load_flags(sub: argparse.ArgumentParser, what: str) -> None:
        sub.add_argument("--load", required=True, help=what)
        sub.add_argument("--ckpt-step", type=int, default=None, help="iteration to read (default: the latest)")

    def out_flags(sub: argparse.ArgumentParser, what: str) -> None:
        sub.add_argument("--out", required=True, help=what)
        sub.add_argument("--force", action="store_true", help="replace an existing non-empty --out")

    to_hf = command("to-hf", "disco_megatron or Megatron-LM torch_dist checkpoint (any TP/PP) -> HuggingFace Llama "
                             "directory")
    load_flags(to_hf, "checkpoint directory (the one holding latest_checkpointed_iteration.txt)")
    out_flags(to_hf, "HF directory to write (config.json, model.safetensors, tokenizer files)")
    to_hf.add_argument("--tokenizer-model", help="sentencepiece .model for the tokenizer files (default: the one "
                                                 "the run's run_config.json records, in --load or its parent)")

    from_hf = command("from-hf", "HuggingFace Llama directory -> disco_megatron or Megatron-LM checkpoint (TP1/PP1, "
                                 "iteration 0)")
    from_hf.add_argument("--hf", required=True, help="HF directory with config.json and model.safetensors")
    out_flags(from_hf, "checkpoint directory to write (then: disco-pretrain --load OUT --no-load-optim ..., or "
                       "Megatron-LM's pretrain_gpt.py --load OUT --finetune ...)")
    from_hf.add_argument("--format", choices=["disco", "megatron-lm"], default="disco",
                         help="disco: for disco-pretrain (default); megatron-lm: Megatron-LM torch_dist with its args")
    from_hf.add_argument("--tokenizer-model", help="sentencepiece .model to check the vocab against "
                                                   "(default: HF_DIR/tokenizer.model when present)")

    reshard = command("reshard", "checkpoint at one TP/PP layout -> another, with optimizer and scheduler state")
    load_flags(reshard, "checkpoint directory written by disco-pretrain or by Megatron-LM (torch_dist; Scion "
                        "momentum of the plug-in included)")
    out_flags(reshard, "checkpoint directory to write")
    reshard.add_argument("--target-tp", type=int, required=True, help="tensor-parallel size to write")
    reshard.add_argument("--target-pp", type=int, required=True, help="pipeline-parallel size to write")
    reshard.add_argument("--run-config", help="the run's run_config.json (default: in --load or its parent; "
                                              "Megatron-LM checkpoints carry their args instead)")

    legacy = command("legacy", "Megatron-LM legacy torch checkpoint (mp_rank_XX[_YYY]) -> disco_megatron checkpoint")
    load_flags(legacy, "Megatron-LM checkpoint directory (iter_N/mp_rank_XX[_YYY]/model_optim_rng.pt)")
    out_flags(legacy, "checkpoint directory to write (TP1/PP1, iteration 0, weights only)")
    legacy.add_argument("--tokenizer-model", help="sentencepiece .model the run used (its vocab size; needed "
                                                  "when the legacy args hold only the padded vocab)")

    inspect = command("inspect", "print a checkpoint's model, layout, progress and tensors (no tensors loaded)")
    load_flags(inspect, "checkpoint directory (disco_megatron or Megatron-LM torch_dist)")
    return parser


DATA_NOTE = ("  (DATA_PREFIX: an indexed dataset tokenized with that tokenizer, see tools/preprocess_data.py; "
             "without a tokenizer, add your --data-path and --tokenizer-model)")


def run(args: argparse.Namespace) -> None:
    from disco_megatron.checkpoint import convert

    if args.command == "to-hf":
        files, tokenizer = convert.to_hf(args.load, args.out, args.ckpt_step, args.tokenizer_model, args.force)
        print(f"wrote {args.out}: {', '.join(files)}")
        if tokenizer is None:
            print("no run_config.json beside the checkpoint and no --tokenizer-model: weights and config only "
                  "(no tokenizer files)")
        else:
            print(f"tokenizer: {tokenizer}; load with transformers' AutoTokenizer and AutoModelForCausalLM "
                  f"from {args.out}")
    elif args.command == "from-hf":
        flags = convert.from_hf(args.hf, args.out, args.tokenizer_model, args.force, args.format)
        print(f"wrote {args.out} (TP1/PP1, iteration 0, no optimizer state); continue training with:")
        if args.format == "megatron-lm":
            print(f"  python pretrain_gpt.py --load {args.out} --finetune {' '.join(flags)} "
                  "(add your data, tokenizer, parallel and optimizer flags; it loads at any TP/PP that pads the "
                  "vocab to the same rows)")
        else:
            print(f"  disco-pretrain --load {args.out} --no-load-optim {' '.join(flags)}")
            print(DATA_NOTE)
    elif args.command == "reshard":
        path = convert.reshard(args.load, args.out, args.target_tp, args.target_pp, args.ckpt_step,
                               args.run_config, args.force)
        print(f"wrote {path} (TP {args.target_tp} x PP {args.target_pp}); resume with --load {args.out} "
              f"--tensor-model-parallel-size {args.target_tp} --pipeline-model-parallel-size {args.target_pp}")
    elif args.command == "legacy":
        iteration, flags = convert.convert_legacy(args.load, args.out, args.ckpt_step, args.tokenizer_model,
                                                  args.force)
        print(f"wrote {args.out} from legacy iteration {iteration} (TP1/PP1, iteration 0, weights only); "
              "continue training with:")
        print(f"  disco-pretrain --load {args.out} --no-load-optim {' '.join(flags)}")
        print(DATA_NOTE)
    else:
        print(convert.inspect_checkpoint(args.load, args.ckpt_step))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0, or 2 with one error line)."""
    args = build_parser().parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # conversions run on CPU (set before torch looks for CUDA)
    from disco_megatron.runtime.quiet import quiet_known_warnings

    quiet_known_warnings()
    from disco_megatron.checkpoint import CheckpointError
    from disco_megatron.config import ConfigError

    try:
        run(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"disco-convert: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

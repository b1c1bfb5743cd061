"""FP8 with TransformerEngine: what the installed TE and GPU can run, and fp32 masters of FP8 weights.

megatron-core 0.16 already does the FP8 plumbing once ``TransformerConfig.fp8`` is set, so it
is not repeated here:

- ``TransformerBlock`` builds its layers under ``fp8_model_init`` when ``fp8_param`` is set
  (FP8 weights) and enters ``fp8_autocast`` itself: around the whole block for delayed
  scaling, per layer for the other recipes, so that ``first_last_layers_bf16`` layers stay
  bf16. A forward step therefore needs no FP8 context of its own (an outer ``fp8_autocast``
  would force FP8 on those bf16 layers).
- ``megatron.core.fp8_utils.get_fp8_recipe`` builds the TE recipe from the config.

What is here:

- :func:`fp8_problem` / :func:`check_fp8`: the ``--fp8-format``/``--fp8-recipe`` choice against
  the installed TE's version and TE's own hardware checks, at start-up and with a message
  naming the flag (instead of an assertion or a CUDA error at the first forward), then the
  recipe is built once through megatron so anything else TE rejects fails at start-up too.
- Scion never runs on FP8 data: the optimizer steps an fp32 master, :func:`master_weight`
  gives its initial value (TE's preserved high-precision init value when there is one), and
  ``param.copy_(master)`` refreshes the FP8 weight: TE's ``QuantizedTensor.__torch_dispatch__``
  turns ``aten.copy_`` into an FP8 destination into ``dst.quantize_(src)``, which re-quantises
  with the tensor's quantizer (scale, amax and transpose caches updated).
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

import torch

from disco_megatron.config import ConfigError, ModelConfig

FP8_FORMATS: tuple[str, ...] = ("e4m3", "hybrid")
FP8_RECIPES: tuple[str, ...] = ("delayed", "tensorwise", "mxfp8", "blockwise")
# Oldest TE per recipe: the gates megatron-core 0.16's get_fp8_recipe applies.
MIN_TE_VERSION: dict[str, str] = {"delayed": "1.0", "tensorwise": "2.2.0.dev0", "mxfp8": "2.1.0",
                                  "blockwise": "2.3.0.dev0"}
# TE's hardware check per recipe, in transformer_engine.pytorch.fp8 (TE <= 2.x) or .quantization.
HARDWARE_CHECK: dict[str, str] = {"delayed": "check_fp8_support", "tensorwise": "check_fp8_support",
                                  "mxfp8": "check_mxfp8_support",
                                  "blockwise": "check_fp8_block_scaling_support"}
_TE_CHECK_MODULES = ("transformer_engine.pytorch.fp8", "transformer_engine.pytorch.quantization")


def fp8_problem(fp8_format: str, recipe: str, te_version: Optional[str],
                hardware: Optional[tuple[bool, str]]) -> Optional[str]:
    """Why ``--fp8-format fp8_format --fp8-recipe recipe`` cannot run; None when it can.

    ``te_version``: the installed TransformerEngine (None: not importable). ``hardware``: TE's
    ``(supported, reason)`` for the recipe on this GPU (None: this TE has no such check).
    """
    from packaging.version import Version

    if fp8_format not in FP8_FORMATS:
        return f"--fp8-format {fp8_format}: choose one of {', '.join(FP8_FORMATS)}"
    if recipe not in FP8_RECIPES:
        return f"--fp8-recipe {recipe}: choose one of {', '.join(FP8_RECIPES)}"
    if te_version is None:
        return ("--fp8-format needs TransformerEngine, which is not importable here (it needs a CUDA GPU; "
                "pip install -e .[te] in the GPU image); drop --fp8-format to train in bf16")
    if Version(te_version) < Version(MIN_TE_VERSION[recipe]):
        return (f"--fp8-recipe {recipe} needs TransformerEngine >= {MIN_TE_VERSION[recipe]}, found {te_version}: "
                "upgrade TransformerEngine or use --fp8-recipe delayed")
    if hardware is not None and not hardware[0]:
        return (f"--fp8-recipe {recipe} is not supported on this GPU ({hardware[1]}); "
                "choose another --fp8-recipe or drop --fp8-format")
    return None


def check_fp8_flags(cfg: ModelConfig) -> None:
    """Flag combinations FP8 needs, checked without TE (so CPU runs fail early too)."""
    if cfg.fp8_param_gather and cfg.fp8_format is None:
        raise ConfigError("--fp8-param-gather keeps FP8 weights and needs --fp8-format e4m3|hybrid")
    if cfg.fp8_param_gather and not cfg.bf16:
        raise ConfigError("--fp8-param-gather needs --bf16: FP8 weights are refreshed from fp32 masters, "
                          "which the optimizers keep for bf16 models")


def have_transformer_engine() -> bool:
    """True when TransformerEngine's PyTorch extension imports (GPU images only)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises OSError/ImportError/RuntimeError without CUDA libraries
        return False
    return True


def installed_te_version() -> Optional[str]:
    """TransformerEngine's version, None when it does not import (no CUDA, not installed)."""
    if not have_transformer_engine():
        return None
    from megatron.core.utils import get_te_version

    return str(get_te_version())


def te_hardware_support(recipe: str) -> Optional[tuple[bool, str]]:
    """TE's own ``(supported, reason)`` for ``recipe`` on this GPU; None when this TE has no check."""
    for module_name in _TE_CHECK_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        check = getattr(module, HARDWARE_CHECK[recipe], None)
        if check is not None:
            supported, reason = check()
            return bool(supported), str(reason)
    return None


def check_fp8(cfg: ModelConfig) -> None:
    """Raise ConfigError when this machine cannot run ``cfg``'s FP8 setting (no-op without FP8)."""
    check_fp8_flags(cfg)
    if cfg.fp8_format is None:
        return
    version = installed_te_version()
    hardware = te_hardware_support(cfg.fp8_recipe) if version is not None and cfg.fp8_recipe in FP8_RECIPES else None
    problem = fp8_problem(cfg.fp8_format, cfg.fp8_recipe, version, hardware)
    if problem is not None:
        raise ConfigError(problem)


def fp8_recipe(config: Any) -> Any:
    """The TE recipe megatron-core will use for ``config`` (a TransformerConfig with ``fp8`` set).

    Built once at start-up so a recipe TE rejects fails with the flags named, not mid-forward.
    """
    from megatron.core.fp8_utils import get_fp8_recipe

    try:
        return get_fp8_recipe(config)
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--fp8-format {config.fp8} --fp8-recipe {config.fp8_recipe}: "
                          f"TransformerEngine rejected the recipe: {exc}") from exc


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a TE quantized (FP8) weight: TE's class, or its in-place ``quantize_`` protocol."""
    from megatron.core.fp8_utils import is_float8tensor

    return is_float8tensor(tensor) or callable(getattr(tensor, "quantize_", None))


def master_weight(param: torch.Tensor) -> torch.Tensor:
    """A new fp32 tensor (on ``param``'s device) with the value an fp32 master of ``param`` starts from.

    For FP8 weights that is TE's high-precision init value when ``fp8_model_init`` kept it
    (``preserve_high_precision_init_val``, which megatron-core requests while training; TE keeps
    it on the CPU, and it is released here as megatron's distributed optimizer does), else the
    weight dequantised straight to fp32 (not through its nominal bf16 dtype, which would round
    it again); for other weights the weight itself, upcast.
    """
    from megatron.core.fp8_utils import is_float8tensor
    from megatron.core.utils import is_te_min_version

    with torch.no_grad():
        if not is_quantized(param):
            value = param.detach()
        elif callable(getattr(param, "get_high_precision_init_val", None)) and \
                param.get_high_precision_init_val() is not None:
            value = param.get_high_precision_init_val()
            param.clear_high_precision_init_val()
        elif is_float8tensor(param) and not is_te_min_version("2.0"):
            value = param.from_float8(dtype=torch.float32)
        else:
            value = param.dequantize(dtype=torch.float32)
        return value.detach().to(device=param.device, dtype=torch.float32, copy=True)

"""GPT built with megatron-core's GPTModel: local spec (plain PyTorch, CPU) or TransformerEngine spec."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from disco_megatron.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig


def transformer_config(cfg: ModelConfig, tp: int, pp: int, *, sequence_parallel: bool = False,
                       vpp: Optional[int] = None, cp: int = 1) -> "TransformerConfig":
    """megatron-core TransformerConfig for this model shape and parallel layout (``vpp``: model chunks
    per stage, ``cp``: context-parallel size)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from disco_megatron.models.fp8 import check_fp8, fp8_recipe

    cfg.validate(tp, pp)
    check_fp8(cfg)
    on_gpu = torch.cuda.is_available()
    fp8 = {}
    if cfg.fp8_format is not None:
        fp8 = dict(fp8=cfg.fp8_format, fp8_recipe=cfg.fp8_recipe, fp8_param=cfg.fp8_param_gather)
    config = TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        ffn_hidden_size=cfg.ffn_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else F.gelu,
        add_bias_linear=cfg.add_bias_linear,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        # Megatron-LM's interleaved default: unbatched p2p, one direction on another communicator. Batched,
        # PP2's two stages would match a gradient sent one way with an activation received the other.
        overlap_p2p_comm=vpp is not None,
        batch_p2p_comm=vpp is None,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        bf16=cfg.bf16,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **fp8,
    )
    if config.fp8:
        fp8_recipe(config)
    return config


def layer_spec(cfg: ModelConfig):
    """The transformer-layer ModuleSpec for ``--transformer-impl``."""
    from megatron.core.models.gpt import gpt_layer_specs

    from disco_megatron.models.fp8 import have_transformer_engine

    if cfg.transformer_impl == "transformer_engine":
        if not have_transformer_engine():
            raise ConfigError(
                "--transformer-impl transformer_engine: TransformerEngine is not importable here "
                "(it needs a CUDA GPU; pip install -e .[te] inside the GPU image) — use --transformer-impl local"
            )
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=cfg.normalization)


def build_gpt_model(
    cfg: ModelConfig,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    *,
    sequence_parallel: bool = False,
    vp_stage: Optional[int] = None,
) -> "GPTModel":
    """This rank's stage of the GPT, or its model chunk ``vp_stage`` under the interleaved schedule
    (parallel_state must be initialised; it gives the virtual-pipeline and context-parallel sizes)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vpp is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vpp is None, vp_stage=vp_stage)
    model = GPTModel(
        config=transformer_config(cfg, tp, pp, sequence_parallel=sequence_parallel, vpp=vpp,
                                  cp=ps.get_context_parallel_world_size()),
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=cfg.padded_vocab_size(tp),
        max_sequence_length=cfg.max_position_embeddings or cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rotary_base,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model

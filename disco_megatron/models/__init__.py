"""GPT models on megatron-core."""
from disco_megatron.models.ddp import wrap_ddp
from disco_megatron.models.fp8 import have_transformer_engine
from disco_megatron.models.gpt import build_gpt_model, transformer_config

__all__ = ["build_gpt_model", "have_transformer_engine", "transformer_config", "wrap_ddp"]

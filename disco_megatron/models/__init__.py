"""GPT models on megatron-core."""
from disco_megatron.models.gpt import build_gpt_model, have_transformer_engine, transformer_config

__all__ = ["build_gpt_model", "have_transformer_engine", "transformer_config"]

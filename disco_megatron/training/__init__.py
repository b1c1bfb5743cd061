"""disco_megatron.training."""

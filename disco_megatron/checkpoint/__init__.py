"""disco_megatron.checkpoint."""

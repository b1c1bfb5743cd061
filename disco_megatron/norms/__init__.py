"""disco_megatron.norms."""

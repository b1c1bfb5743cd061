"""disco_megatron.integrations."""

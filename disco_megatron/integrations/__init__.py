"""Plug-ins for other training stacks: ``megatron_lm`` runs Scion in Megatron-LM's own pretrain loop."""

"""disco_megatron: distributed Scion ("Disco") for megatron-core."""

__version__ = "0.1.0"

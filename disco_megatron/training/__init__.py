"""The pretraining loop on megatron-core: ``setup`` (a run before its first step), ``step`` (one
training step, evaluation), ``loop`` (``pretrain``: steps, then log/eval/save), ``logs``."""


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row)."""

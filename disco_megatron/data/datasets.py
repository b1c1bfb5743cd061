"""megatron-core GPT datasets (train/valid/test) and a resumable data-parallel batch iterator."""

from __future__ import annotations

import os
from typing import Iterator

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.tokenizers import MegatronTokenizerBase

from disco_megatron.data.indexed import require_indexed_dataset


def _every_rank() -> bool:
    """All ranks hold the datasets; megatron-core lets rank 0 build the index cache first."""
    return True


def build_gpt_datasets(
    data_prefix: str,
    tokenizer: MegatronTokenizerBase,
    seq_length: int,
    num_samples: tuple[int, int, int],
    split: str = "98,2,0",
    seed: int = 1234,
    cache_dir: str | None = None,
) -> tuple[GPTDataset | None, GPTDataset | None, GPTDataset | None]:
    """Train, validation and test ``GPTDataset`` (None for a split weighted 0).

    Collective when torch.distributed is initialized (call it on every rank): rank 0 builds the
    shuffle/sample index cache under ``cache_dir`` (default ``<data dir>/gpt_index_cache``),
    the others wait at a barrier and load it, so ``cache_dir`` must be visible to all ranks.
    """
    require_indexed_dataset(data_prefix)
    if seq_length <= 0:
        raise ValueError(f"--seq-length {seq_length}: must be positive")
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(
            f"num_samples={num_samples}: need three non-negative sample counts (train, valid, test)"
        )
    weights = split.split(",")
    try:
        parsed = [float(w) for w in weights]
    except ValueError:
        parsed = []
    if not 1 <= len(parsed) <= 3 or any(w < 0 for w in parsed) or sum(parsed) <= 0:
        raise ValueError(
            f"--split {split}: expected up to three non-negative weights such as 98,2,0"
        )
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([data_prefix], None),
        split=split,
        path_to_cache=cache_dir
        or os.path.join(os.path.dirname(os.path.abspath(data_prefix)), "gpt_index_cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), _every_rank, config)
    train, valid, test = builder.build()
    return train, valid, test


class MicroBatchIterator:
    """Micro-batches of one data-parallel rank, in an order fixed by ``consumed_samples``.

    Like Megatron-LM's ``MegatronPretrainingSampler``: each step takes the next
    ``micro_batch_size * dp_size`` global samples; rank ``r`` gets sample indices
    ``consumed + r * micro_batch_size + i``. Resuming with the saved ``consumed_samples`` yields
    exactly the continuation. Stops before a step the dataset cannot fill.
    """

    def __init__(
        self,
        dataset: GPTDataset,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
    ) -> None:
        if micro_batch_size <= 0:
            raise ValueError(f"--micro-batch-size {micro_batch_size}: must be positive")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"data-parallel rank {dp_rank} of size {dp_size}: need 0 <= rank < size"
            )
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples}: must be non-negative")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        """Global samples consumed by all DP ranks together; save it to resume."""

    def __iter__(self) -> MicroBatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor | None]:
        step = self.micro_batch_size * self.dp_size
        if self.consumed_samples + step > len(self.dataset):
            raise StopIteration
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        items = [self.dataset[first + i] for i in range(self.micro_batch_size)]
        self.consumed_samples += step
        batch: dict[str, torch.Tensor | None] = {
            key: torch.stack([item[key] for item in items])
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
        batch["attention_mask"] = None  # the model applies causal masking itself
        return batch


def micro_batches(
    dataset: GPTDataset,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    consumed_samples: int = 0,
) -> Iterator[dict[str, torch.Tensor | None]]:
    """This rank's micro-batches starting after ``consumed_samples`` global samples."""
    return MicroBatchIterator(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples)

"""Shared fixtures: the embedded corpus/tokenizer/dataset is built once per machine and cached."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def embedded_data() -> tuple[str, str]:
    """(indexed dataset prefix, sentencepiece model) of the embedded corpus, vocab 4096."""
    from disco_megatron.data import build_embedded_dataset

    return build_embedded_dataset(os.environ.get("DISCO_CACHE_DIR"), 4096)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("DISCO_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: covered by a faster test; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

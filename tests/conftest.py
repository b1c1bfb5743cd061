"""Shared fixtures: the embedded corpus/tokenizer/dataset is built once per machine and cached."""
from __future__ import annotations

import inspect
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


# A test that calls one of these starts several ranks (gloo processes): marked ``multirank``.
MULTIRANK_CALLS = ("run_workers(", "torchrun(", "reshard(")


def _starts_ranks(function: object, seen: set[int]) -> bool:
    """Whether ``function``, a same-module helper it names, or a fixture it uses calls one of
    :data:`MULTIRANK_CALLS` (read from the source, so nothing is run)."""
    code = getattr(function, "__code__", None)
    if code is None or id(code) in seen:
        return False
    seen.add(id(code))
    try:
        if any(call in inspect.getsource(function) for call in MULTIRANK_CALLS):
            return True
    except (OSError, TypeError):
        return False
    module_globals = getattr(function, "__globals__", {})
    names = set(code.co_names) | {name for const in code.co_consts if inspect.iscode(const) for name in const.co_names}
    return any(_starts_ranks(module_globals.get(name), seen) for name in names
               if inspect.isfunction(module_globals.get(name))
               and module_globals[name].__module__ == function.__module__)


def _item_starts_ranks(item: pytest.Item) -> bool:
    seen: set[int] = set()
    fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return _starts_ranks(getattr(item, "function", None), seen) or any(
        _starts_ranks(definition.func, seen) for definitions in fixtures.values() for definition in definitions)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _item_starts_ranks(item):
            item.add_marker(pytest.mark.multirank)
    if config.getoption("--runslow") or os.environ.get("DISCO_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: covered by a faster test; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

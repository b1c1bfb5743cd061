"""Where norm records go: one JSON line per logged step, and TensorBoard scalars.

JSONL is strict JSON: non-finite values (a diverged run's NaN/inf norms or loss) are written
as ``null``. TensorBoard tags: ``norms/<kind>/<norm>/<matrix key>`` and
``norms/group/<kind>/<norm>/<group>`` for each kind of :data:`RECORD_KINDS` the record has,
plus ``norms/tokens``, ``norms/loss`` and
``norms/lr/<group>`` so that a run with only TensorBoard events still holds whole records
(TensorBoard stores float32: token counts above 2^24 are rounded).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

from disco_megatron.config import RunDir

# (kind, record key): parameters, the optimizer's steps, the actual weight changes.
RECORD_KINDS = (("param", "params"), ("update", "updates"), ("weight_change", "weight_changes"))


def norm_log_path(explicit: str | None, run_dir: str | None, tensorboard_dir: str | None,
                  save: str | None) -> str | None:
    """Where norms.jsonl goes: ``explicit``, else the first of the run, TensorBoard and checkpoint
    directories that is set (one rule for ``disco-pretrain`` and the Megatron-LM plug-in)."""
    directory = run_dir or tensorboard_dir or save
    return explicit or (directory and RunDir(directory).norms) or None


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


class JsonlNormWriter:
    """Appends one line per record and closes the file each time (a crash loses at most that line).

    A resumed run appends to the same file; a line a crash left unfinished is terminated first
    so it cannot swallow the next record.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def write(self, record: dict) -> None:
        line = json.dumps(_finite_or_none(record), allow_nan=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def read_norms_jsonl(path: str) -> list[dict]:
    """Records of a ``norms.jsonl`` in step order, one per step.

    Lines that are not JSON (a crash mid-write) are skipped with a warning. A resumed run
    logs the steps after its checkpoint again: the last record of a step wins.
    """
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (json.JSONDecodeError, TypeError, KeyError, ValueError):
                warnings.warn(f"{path}:{number}: skipped a line that is not a JSON norm record "
                              "(cut short by a crash?)", stacklevel=2)
                continue
            by_step[step] = record
    return [by_step[step] for step in sorted(by_step)]


class TensorBoardNormWriter:
    """Writes a record as scalars at ``record["step"]`` to a ``SummaryWriter`` the caller owns."""

    def __init__(self, summary_writer: Any) -> None:
        self.tb = summary_writer

    def _scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is not None:
            self.tb.add_scalar(tag, value, step)

    def write(self, record: dict) -> None:
        step = record["step"]
        self._scalar("norms/tokens", record.get("tokens"), step)
        self._scalar("norms/loss", record.get("loss"), step)
        for group, lr in record.get("lr", {}).items():
            self._scalar(f"norms/lr/{group}", lr, step)
        for kind, key in RECORD_KINDS:
            if key not in record:
                continue
            for name, norms in record[key].items():
                for norm, value in norms.items():
                    self._scalar(f"norms/{kind}/{norm}/{name}", value, step)
            for group, norms in record["groups"][kind].items():
                for norm, value in norms.items():
                    self._scalar(f"norms/group/{kind}/{norm}/{group}", value, step)
        self.tb.flush()


def read_norms_tensorboard(directory: str) -> list[dict]:
    """Records rebuilt from the ``norms/...`` scalars of the event files under ``directory``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = sorted({root for root, _, files in os.walk(directory) if any("tfevents" in f for f in files)})
    by_step: dict[int, dict] = {}
    for event_dir in event_dirs:
        accumulator = EventAccumulator(event_dir, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if not tag.startswith("norms/"):
                continue
            for event in accumulator.Scalars(tag):
                record = by_step.setdefault(event.step, {
                    "step": event.step, "tokens": None, "loss": None, "lr": {},
                    **{key: {} for _, key in RECORD_KINDS}, "groups": {kind: {} for kind, _ in RECORD_KINDS}})
                _set_from_tag(record, tag, event.value)
    return [_without_absent_kinds(by_step[step]) for step in sorted(by_step)]


def _without_absent_kinds(record: dict) -> dict:
    """The record without the kinds it has no scalar of (as written: e.g. no ``updates`` without a step source)."""
    for kind, key in RECORD_KINDS:
        if not record[key] and not record["groups"][kind]:
            del record[key], record["groups"][kind]
    return record


def _set_from_tag(record: dict, tag: str, value: float) -> None:
    parts = tag.split("/")
    if tag == "norms/tokens":
        record["tokens"] = int(round(value))
    elif tag == "norms/loss":
        record["loss"] = value
    elif parts[1] == "lr" and len(parts) == 3:
        record["lr"][parts[2]] = value
    elif parts[1] == "group" and len(parts) == 5 and parts[2] in record["groups"]:
        record["groups"][parts[2]].setdefault(parts[4], {})[parts[3]] = value
    elif len(parts) == 4 and parts[1] in dict(RECORD_KINDS):
        record[dict(RECORD_KINDS)[parts[1]]].setdefault(parts[3], {})[parts[2]] = value

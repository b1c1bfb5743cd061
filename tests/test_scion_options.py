"""One set of Scion options: the CLI, the Megatron-LM plug-in's flags, ScionConfig and README's flag
table all say what ``disco_megatron.scion_options`` says, and every bad value is one ValueError
naming the flag."""
from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from disco_megatron import scion_options
from disco_megatron.scion_options import CHOICES, DEFAULTS, SCION_FLAGS, ScionFlags, ns_dtype_for

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_field_has_one_flag_and_the_defaults_are_valid() -> None:
    fields = [f.name for f in dataclasses.fields(ScionFlags)]
    assert list(SCION_FLAGS) == fields
    assert [flag for flag, _, _ in SCION_FLAGS.values()] == ["--scion-" + f.replace("_", "-") for f in fields]
    assert set(CHOICES) <= set(fields)
    assert all(getattr(DEFAULTS, name) in allowed for name, allowed in CHOICES.items() if name != "ns_dtype")
    assert DEFAULTS.ns_dtype is None  # by device: bf16 on CUDA, fp32 on CPU
    assert (ns_dtype_for(None, "cuda"), ns_dtype_for(None, "cpu"), ns_dtype_for("fp32", "cuda")) == \
        ("bf16", "fp32", "fp32")
    scion_options.validate(DEFAULTS)


def test_cli_and_plugin_parsers_take_the_defaults_from_scion_options() -> None:
    from disco_megatron.config import build_parser

    cli = vars(build_parser().parse_args([]))
    assert ScionFlags(**{k[len("scion."):]: v for k, v in cli.items() if k.startswith("scion.")}) == DEFAULTS
    plugin = argparse.ArgumentParser()
    scion_options.add_scion_arguments(plugin, "scion_", argparse_choices=True)
    assert ScionFlags(**{k[len("scion_"):]: v for k, v in vars(plugin.parse_args([])).items()}) == DEFAULTS
    with pytest.raises(SystemExit):
        plugin.parse_args(["--scion-qkv-split", "rows"])


def test_scion_config_defaults_are_the_cli_defaults() -> None:
    from disco_megatron.optim.config import ScionConfig, scion_config_from_flags

    assert ScionConfig(lr=0.02).as_flags() == dataclasses.replace(DEFAULTS, lr_hidden=0.02)
    config = scion_config_from_flags(DEFAULTS, lr=0.02)
    assert config.as_flags() == dataclasses.replace(DEFAULTS, lr_embedding=0.02, lr_hidden=0.02, lr_output=0.02)


BAD = [("momentum", 0.0, "(0, 1]"), ("momentum", 1.5, "(0, 1]"), ("ns_steps", 0, "positive integer"),
       ("radius_output", float("nan"), "finite number >= 0"), ("lr_embedding", -0.1, "finite number >= 0"),
       ("weight_decay", -1.0, ">= 0"), ("tp_mode", "gather", "owner, duplicated, local"),
       ("qkv_split", "rows", "fused, qkv, head"), ("output_lmo", "spectral", "rownorm, sign"),
       ("ns_backend", "qr", "ns5, polar_express, svd"), ("dp_mode", "zero", "replicated, sharded")]


@pytest.mark.parametrize("name,value,fix", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_a_bad_value_names_its_flag_and_the_fix(name: str, value: object, fix: str) -> None:
    with pytest.raises(ValueError, match=re.escape(SCION_FLAGS[name][0])) as error:
        scion_options.validate(dataclasses.replace(DEFAULTS, **{name: value}))
    assert fix in str(error.value)


def test_sharded_dp_needs_owner_tp_mode() -> None:
    with pytest.raises(ValueError, match="--scion-dp-mode sharded .* needs --scion-tp-mode owner"):
        scion_options.validate(dataclasses.replace(DEFAULTS, tp_mode="duplicated", dp_mode="sharded"))


def _readme_rows() -> dict[str, str]:
    """README's Scion flag table: flag (braces expanded, choices kept) -> the row's last "(...)"."""
    rows = {}
    for line in README.read_text().splitlines():
        for cell in re.findall(r"`(--scion-[^`]+)`", line.split("|")[1] if line.startswith("| `") else ""):
            default = re.findall(r"\(([^()]*)\) \|$", line)
            names = re.fullmatch(r"(--scion-[a-z-]*?)(?:\{([a-z,]+)\})?( \{[a-z0-9_,]+\})?", cell)
            stem, parts, choices = names.groups()
            for i, part in enumerate(parts.split(",") if parts else [""]):
                value = default[0].split(", ")[i] if parts and "," in default[0] else default[0]
                rows[stem + part] = (value, choices.strip(" {}").split(",") if choices else None)
    return rows


def _as_in_readme(name: str, default: object) -> str:
    if name == "ns_dtype":
        return scion_options.NS_DTYPE_DEFAULT_TEXT
    if default is None:
        return "`--lr`"
    if isinstance(default, bool):
        return "on" if default else "off"
    return f"{default:g}" if isinstance(default, (int, float)) else str(default)


def test_readme_flag_table_matches_the_options() -> None:
    rows = _readme_rows()
    assert set(rows) == {flag for flag, _, _ in SCION_FLAGS.values()}
    for name, (flag, _, _) in SCION_FLAGS.items():
        shown, choices = rows[flag]
        assert shown == _as_in_readme(name, getattr(DEFAULTS, name)), flag
        assert choices == (list(CHOICES[name]) if name in CHOICES else None), flag

"""One set of Scion options: the CLI, the Megatron-LM plug-in's flags, ScionConfig and README's flag
table all say what ``disco_megatron.scion_options`` says, and every bad value is one ValueError
naming the flag."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest

from disco_megatron import scion_options
from disco_megatron.scion_options import CHOICES, DEFAULTS, SCION_FLAGS, ScionFlags, ns_dtype_for

README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULTS_DOC = README.parent / "docs" / "defaults.md"


def test_every_field_has_one_flag_and_the_defaults_are_valid() -> None:
    fields = [f.name for f in dataclasses.fields(ScionFlags)]
    assert list(SCION_FLAGS) == fields
    assert [flag for flag, _, _ in SCION_FLAGS.values()] == ["--scion-" + f.replace("_", "-") for f in fields]
    assert set(CHOICES) <= set(fields)
    assert all(getattr(DEFAULTS, name) in allowed for name, allowed in CHOICES.items()
               if name not in ("ns_dtype", "preset"))
    assert DEFAULTS.ns_dtype is None  # by device: bf16 on CUDA, fp32 on CPU
    assert DEFAULTS.preset is None
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
       ("ns_backend", "qr", "ns5, polar_express, svd"), ("dp_mode", "zero", "replicated, sharded"),
       ("preset", "titan", "disco")]


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
        first = line.split("|")[1].strip() if line.startswith("| `") else ""
        # flag-table cells name flags (with {choices}); other tables' cells may add a value ("`--scion-dp-mode sharded`")
        for cell in re.findall(r"`(--scion-[a-z-]*(?:\{[a-z,]+\})?(?: \{[a-z0-9_,]+\})?)`", first):
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
        return "`--lr`" if name.startswith("lr_") else "none"
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


# rakkit/disco@d18ea04 example.py L50-76, read by hand: lr 1e-2 in every group, momentum 0.1, weight decay 0
# (unconstrained), newtonschulz5 x 5, norm factors spectral / embed_sqrt / unembed_sqrt at scale 1.
DISCO_EXAMPLE = dict(lr_embedding=0.01, lr_hidden=0.01, lr_output=0.01, momentum=0.1, radius_embedding=1.0,
                     radius_hidden=1.0, radius_output=1.0, constrained=False, weight_decay=0.0, ns_backend="ns5",
                     ns_steps=5, qkv_split="qkv", output_lmo="rownorm")


def _cli(argv: list[str]) -> ScionFlags:
    from disco_megatron.config import parse_run_config

    return parse_run_config(argv).scion


def _plugin(argv: list[str]) -> ScionFlags:
    parser = argparse.ArgumentParser()
    scion_options.add_scion_arguments(parser, "scion_", argparse_choices=True)
    parser.add_argument("--lr", type=float, default=None)  # Megatron-LM's: None unless given
    values = vars(parser.parse_args(argv))
    return scion_options.flags_from_values(values, "scion_", lr_given=values["lr"] is not None)


@pytest.mark.parametrize("parse", [_cli, _plugin], ids=["disco-pretrain", "plugin"])
def test_disco_preset_is_the_reference_example(parse) -> None:
    assert parse(["--scion-preset", "disco"]) == dataclasses.replace(DEFAULTS, **DISCO_EXAMPLE,
                                                                     preset="disco")
    assert parse([]) == DEFAULTS  # no preset: the defaults, untouched


@pytest.mark.parametrize("parse", [_cli, _plugin], ids=["disco-pretrain", "plugin"])
@pytest.mark.parametrize("order", ["preset first", "preset last"])
def test_flags_given_on_the_command_line_override_the_preset(parse, order) -> None:
    given = ["--scion-momentum", "0.5", "--scion-radius-output=7", "--scion-lr-output", "0.3", "--scion-constrained",
             "--scion-radius-hidden", str(DEFAULTS.radius_hidden)]  # equal to the default, still given
    argv = ["--scion-preset", "disco", *given] if order == "preset first" else [*given, "--scion-preset", "disco"]
    expected = {**DISCO_EXAMPLE, "momentum": 0.5, "radius_output": 7.0, "lr_output": 0.3, "constrained": True,
                "radius_hidden": DEFAULTS.radius_hidden}
    assert parse(argv) == dataclasses.replace(DEFAULTS, **expected, preset="disco")


@pytest.mark.parametrize("parse", [_cli, _plugin], ids=["disco-pretrain", "plugin"])
def test_an_explicit_lr_replaces_the_presets_group_lrs(parse) -> None:
    flags = parse(["--scion-preset", "disco", "--lr", "0.03", "--scion-lr-embedding", "0.2"])
    assert (flags.lr_embedding, flags.lr_hidden, flags.lr_output) == (0.2, None, None)  # None: follow --lr
    assert flags.radius_hidden == DISCO_EXAMPLE["radius_hidden"]


def test_preset_is_recorded_in_run_config_and_replayed_as_resolved(tmp_path: Path) -> None:
    from disco_megatron.config import RunConfig, parse_run_config

    cfg = parse_run_config(["--scion-preset", "disco", "--scion-momentum", "0.5"])
    recorded = json.loads(json.dumps(cfg.to_dict()))
    assert recorded["scion"]["preset"] == "disco" and recorded["scion"]["momentum"] == 0.5
    assert recorded["scion"]["radius_output"] == DISCO_EXAMPLE["radius_output"]
    assert RunConfig.from_dict(recorded).scion == cfg.scion
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(recorded))
    # Replaying keeps the recorded (resolved) values, momentum 0.5 included; a flag given again wins.
    assert parse_run_config(["--config", str(path)]).scion == cfg.scion
    assert parse_run_config(["--config", str(path), "--scion-radius-hidden", "2"]).scion == \
        dataclasses.replace(cfg.scion, radius_hidden=2.0)
    # The preset given again applies over the recorded values, except the flags given with it.
    assert parse_run_config(["--config", str(path), "--scion-preset", "disco"]).scion == \
        dataclasses.replace(cfg.scion, momentum=DISCO_EXAMPLE["momentum"])


def test_help_lists_each_presets_values_and_source() -> None:
    from disco_megatron.config import build_parser

    text = " ".join(build_parser().format_help().split())
    for name, preset in scion_options.PRESETS.items():
        assert f"{name} = " in text and " ".join(preset.source.split()) in text
    assert "radius_output 1, constrained False" in text and "lr_hidden 0.01" in text


def test_defaults_doc_holds_every_default_with_its_source() -> None:
    assert set(scion_options.SOURCES) == set(SCION_FLAGS) | {"clip_grad"}
    table = scion_options.defaults_table()
    assert table in DEFAULTS_DOC.read_text(), "regenerate the table in docs/defaults.md from defaults_table()"
    for name, (flag, _, _) in SCION_FLAGS.items():
        assert f"| `{flag}` | {scion_options._default_text(name, getattr(DEFAULTS, name))} |" in table

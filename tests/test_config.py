"""One source for defaults: config.py, the CLI options, the API and the README table agree."""

from __future__ import annotations

import re
from pathlib import Path

import click

from scrcl_cli import config as C
from scrcl_cli.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_table() -> dict[str, tuple[str, str]]:
    rows = re.findall(r"^\| `--([a-z0-9-]+)` \| ([^|]*) \| ([^|]*) \|", README.read_text(), re.M)
    return {name.replace("-", "_"): (default.strip(), spatial.strip()) for name, default, spatial in rows}


def test_readme_defaults_table_is_the_config():
    table = _readme_table()
    fields = {k: v for k, v in C.TRAIN_DEFAULTS.as_dict().items()}
    assert set(table) == set(fields), set(table) ^ set(fields)
    for name, value in fields.items():
        default, spatial = table[name]
        assert default == str(value), (name, default, value)
        assert spatial == str(C.SPATIAL_DEFAULTS.get(name, "")), (name, spatial)


def test_cli_train_options_default_to_the_config():
    train = cli.commands["train"]
    params = {p.name: p for p in train.params if isinstance(p, click.Option)}
    for name, value in C.TRAIN_DEFAULTS.as_dict().items():
        option = params["input_mode" if name == "input_mode" else name]
        if name == "n_top_genes":  # None on the command line: 2000, or the spatial default with --spatial
            assert option.default is None
            continue
        assert option.default == value, (name, option.default, value)
    demo = {p.name: p.default for p in cli.commands["demo"].params}
    assert demo["epochs"] == C.DEMO_EPOCHS and demo["hidden_dim"] == C.DEMO_HIDDEN_DIM

"""The config-to-command-line helper: one flag per field, defaults from the dataclass, flag-named errors."""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from signal_drift import InputError
from signal_drift.calibrate import CalibrateConfig
from signal_drift.dynamics import DynamicsConfig
from signal_drift.settings import ConfigParser, field_help, flag
from signal_drift.spectra import SpectraConfig
from signal_drift.sweep import MLPSweepConfig
from signal_drift.train import TrainConfig
from signal_drift.train.sweep import TrainSweepConfig

CONFIGS = [SpectraConfig, DynamicsConfig, MLPSweepConfig, TrainConfig, TrainSweepConfig, CalibrateConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_no_flags_give_the_default_config_and_every_field_has_a_flag_with_help(cls):
    p = ConfigParser(cls, prog="x")
    cfg, _ = p.parse_config([])
    assert cfg == cls()
    opts = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(cls):
        assert flag(f.name) in opts[f.name].option_strings
        assert opts[f.name].help, f"{cls.__name__}.{f.name} has no help text"


@dataclass(frozen=True)
class Demo:
    """A demo.

    Attributes:
        seq_len: tokens per window, see ``steps``.
        a_b, c_d: two at once,
            on two lines.
    """

    seq_len: int = 128
    steps: int = 0
    ranks: tuple[int, ...] = (4, 8)
    alphas: tuple[float, ...] | None = None
    model: str | None = None
    kind: Literal["x", "y"] = "x"
    exact: bool = False
    plot: bool = True
    a_b: float = 1.0
    c_d: float = 2.0
    shift: float = field(default=0.5, metadata={"help": "from metadata"})

    def validate(self):
        if self.steps < 0 or self.seq_len < 1:
            raise InputError(
                "seq_len/steps out of range (steps_total untouched)", fields=["seq_len", "steps"]
            )


def test_types_defaults_and_help_come_from_the_dataclass():
    p = ConfigParser(Demo, prog="demo")
    argv = ["--seq-len", "7", "--ranks", "1", "2", "--alphas", "0.5", "2", "--model", "m", "--kind", "y",
            "--exact", "--no-plot", "--a-b", "3"]  # fmt: skip
    cfg, _ = p.parse_config(argv)
    assert cfg == Demo(seq_len=7, ranks=(1, 2), alphas=(0.5, 2.0), model="m", kind="y", exact=True, plot=False,
                       a_b=3.0)  # fmt: skip
    assert field_help(Demo) == {
        "seq_len": "tokens per window, see ``steps``.",
        "a_b": "two at once, on two lines.",
        "c_d": "two at once, on two lines.",
    }
    text = p.format_help()
    assert "tokens per window, see --steps (default: 128)" in text
    assert "{x,y}" in text and "from metadata (default: 0.5)" in text and "(default: 4 8)" in text


def test_a_validate_error_names_flags_and_only_the_fields_it_lists():
    with pytest.raises(InputError, match=r"^--seq-len/--steps out of range \(steps_total untouched\)$"):
        ConfigParser(Demo, prog="demo").parse_config(["--steps", "-1"])
    with pytest.raises(InputError, match=r"^seq_len/steps out of range"):
        Demo(steps=-1).validate()


def test_a_field_type_with_no_flag_form_is_refused():
    @dataclass(frozen=True)
    class Bad:
        mapping: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="Bad.mapping"):
        ConfigParser(Bad, prog="bad")

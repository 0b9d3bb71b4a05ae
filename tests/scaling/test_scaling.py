import json
import math
import subprocess
import sys

import pytest
from cases import assert_cli_refuses

from signal_drift import AdapterSpec, InputError, Rule, effective_alpha, lora_scale, table6, variant_ii_alpha

TABLE6 = [  # the paper's Table 6 (n = 4096)
    (1, 1, 256, 111, 256.0), (4, 4, 512, 222, 128.0), (8, 8, 724, 314, 90.5), (16, 16, 1024, 443, 64.0),
    (32, 32, 1448, 627, 45.3), (64, 64, 2048, 887, 32.0), (128, 128, 2896, 1254, 22.6),
    (256, 256, 4096, 1774, 16.0),
]  # fmt: skip


def test_table6_matches_the_paper_exactly():
    rows = table6(4096, [r[0] for r in TABLE6])
    assert [tuple(r.values()) for r in rows] == TABLE6


def test_scaling_cli_prints_table6_and_json():
    ranks = ["1", "4", "8", "16", "32", "64", "128", "256"]
    args = [sys.executable, "-m", "signal_drift.scaling", "--fan-in", "4096", "--ranks", *ranks]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    for r, h, v1, v2, ratio in TABLE6:
        assert f"| {r} | {h} | {v1} | {v2} | {ratio:.1f} |" in out
    js = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True, check=True).stdout)
    assert js[2] == {"r": 8, "heuristic": 8, "variant_i": 724, "variant_ii": 314, "ratio": 90.5}


def test_variant_ii_makes_alpha_squared_rho_one():
    for init, std in (("gaussian", 0.3), ("kaiming_uniform", None)):
        from signal_drift import init_variance

        s2 = init_variance(init, 64, std)
        a = effective_alpha(Rule.VARIANT2, 8, fan_in=64, init=init, init_std=std)
        assert math.isclose(a**2 * s2 / 8, 1.0, rel_tol=1e-12)
    assert math.isclose(variant_ii_alpha(1, 1 / (3 * 4096)), 110.85, abs_tol=0.01)


def test_every_rule_goes_through_the_one_scale_formula():
    spec = AdapterSpec(
        "l", fan_out=32, fan_in=16, rank=4, alpha=effective_alpha("rslora", 4, alpha=16), gamma=2.0
    )
    assert spec.scale == lora_scale(spec.alpha, 4, 2.0) == 2.0 * 16 / math.sqrt(4)
    assert effective_alpha("variant1", 16) / 16 == 256 / 4  # = rsLoRA with lora_alpha 256
    assert effective_alpha("rank", 8) == 8 and effective_alpha("double_rank", 8) == 16
    assert effective_alpha("fixed", 8, alpha=16) == 16


@pytest.mark.parametrize("bad", [{"rule": "nope"}, {"rank": 0}, {"rule": "variant2"}])
def test_bad_rule_arguments_raise_input_error(bad):
    kw = {"rule": "rank", "rank": 4} | bad
    with pytest.raises(InputError):
        effective_alpha(kw.pop("rule"), kw.pop("rank"))


def test_scaling_cli_rejects_rank_zero():
    assert_cli_refuses(["signal_drift.scaling", "--ranks", "0"], "--ranks=0")


@pytest.mark.parametrize(
    "alpha,rank,gamma,needle",
    [(16, -4, 1.0, "rank=-4"), (16, 0, 1.0, "rank=0"), (16, 2.5, 1.0, "rank=2.5"), (-16, 4, 1.0, "alpha=-16"),
     (0, 4, 1.0, "alpha=0"), (float("nan"), 4, 1.0, "alpha=nan"), (16, 4, -1.0, "gamma=-1.0")],
)  # fmt: skip
def test_lora_scale_refuses_a_rank_alpha_or_gamma_out_of_range(alpha, rank, gamma, needle):
    with pytest.raises(InputError, match=needle):
        lora_scale(alpha, rank, gamma)

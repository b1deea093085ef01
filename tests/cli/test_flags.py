"""lrt-export translates the config fields library errors name into its flags, in one table."""

from __future__ import annotations

import pytest

from lrt_deploy.cli.export import FLAGS, in_flags


@pytest.mark.parametrize(
    ("library", "cli"),
    [
        ("BudgetRank.budget must be a fraction in (0, 1), got 1.5",
         "--budget must be a fraction in (0, 1), got 1.5"),
        ("HealConfig.batch must be in 1..4096, got 0", "--heal-batch must be in 1..4096, got 0"),
        ("heal=HealConfig(...) needs a factorization (compress=LowRankConfig(...)) or "
         "HealConfig.quantized=True",
         "--heal needs a factorization (--rank, --budget, --energy or --fidelity-floor) or "
         "--heal-quantized"),
        ("device='cuda' was asked for: use device='auto' or 'cpu'",
         "--device cuda was asked for: use --device auto or cpu"),
        ("export it without compress=, or load it with trust_pickle=True",
         "export it without --rank, or load it with --trust-pickle"),
        ("use precision=Int4WeightOnly()", "use --quantize int4"),
        ("Target.fixed_shape sequence=100 exceeds", "--fixed-shape sequence=100 exceeds"),
        ("calibration data is short", "calibration data is short"),  # prose stays prose
    ],
)
def test_fields_become_flags(library: str, cli: str) -> None:
    assert in_flags(library) == cli


def test_every_translation_is_a_flag_phrase() -> None:
    assert all(flag.startswith("-") for flag in FLAGS.values())


def test_a_config_error_reaches_the_user_in_flags(capsys) -> None:
    from lrt_deploy.cli.export import main

    assert main(["all-MiniLM-L6-v2", "--energy", "1.5", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lrt-export: error: --energy must be a fraction in (0, 1], got 1.5"

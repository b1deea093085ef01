"""make_plan decides everything an export does from configs and model facts, with no torch."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lrt_deploy.config import BudgetRank, FidelityFloor, HealConfig, LowRankConfig
from lrt_deploy.errors import ConfigError, UnsupportedOperationError
from lrt_deploy.export.build import ModelKind
from lrt_deploy.export.targets import Target
from lrt_deploy.plan import CALIBRATION_HEAD_LINES, BenchmarkSettings, ModelFacts, make_plan
from lrt_deploy.quant.recipes import DynamicInt8, StaticInt8

TEXT = ModelFacts("bert", "huggingface", is_text=True, can_compress=True, max_length=128,
                  max_sequence=512)
GRAPH = ModelFacts("net", "torchscript", is_text=False, can_compress=False)
NET = ModelFacts("net", "pickle", is_text=False, can_compress=True)


def test_a_plain_export_builds_the_dense_model_and_reads_nothing() -> None:
    plan = make_plan(TEXT, Target.cpu())
    assert plan.models == (ModelKind.DENSE,) and plan.is_baseline(ModelKind.DENSE)
    assert not (plan.compressing or plan.read_calibration or plan.calibrate or plan.by_design)


def test_a_factorization_builds_dense_then_lrt_and_calibrates_asvd() -> None:
    plan = make_plan(TEXT, Target.cpu(), compress=LowRankConfig(rank=0.5))
    assert plan.models == (ModelKind.DENSE, ModelKind.LRT)
    assert plan.is_baseline(ModelKind.DENSE) and not plan.is_baseline(ModelKind.LRT)
    assert plan.compressing and plan.read_calibration and not plan.probe
    svd = make_plan(TEXT, Target.cpu(), compress=LowRankConfig(rank=0.5, solver="svd"))
    assert not svd.read_calibration


def test_quantisation_aware_healing_alone_builds_the_healed_model() -> None:
    heal = HealConfig(3, quantized=True)
    plan = make_plan(TEXT, Target.cpu(precision=DynamicInt8()), heal=heal)
    assert plan.models == (ModelKind.DENSE, ModelKind.HEALED) and plan.compressing
    assert plan.calibrate  # dynamic int8 smooths outliers on calibration data


def test_healing_streams_a_text_calibration_file_and_reads_its_head(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("a\n", encoding="utf-8")
    compress = LowRankConfig(rank=0.5)
    plan = make_plan(TEXT, Target.cpu(), compress=compress, heal=HealConfig(2),
                     calibration=text)
    assert plan.stream_text and plan.healing_text == text
    assert plan.calibration_lines == CALIBRATION_HEAD_LINES
    corpus = make_plan(TEXT, Target.cpu(), compress=compress,
                       heal=HealConfig(2, corpus=text), calibration=None)
    assert corpus.stream_text and corpus.calibration_lines is None
    npz = make_plan(NET, Target.cpu(), compress=compress, heal=HealConfig(2),
                    calibration=tmp_path / "inputs.npz")
    assert not npz.stream_text


def test_a_fidelity_floor_probes_the_other_domain_on_text_models() -> None:
    floor = LowRankConfig(FidelityFloor(0.99), solver="svd")
    assert make_plan(TEXT, Target.cpu(), compress=floor).probe
    assert make_plan(TEXT, Target.cpu(), compress=floor).read_calibration
    assert not make_plan(NET, Target.cpu(), compress=floor).probe


def test_calibration_for_the_precision() -> None:
    assert make_plan(NET, Target.cpu(precision=StaticInt8())).calibrate
    assert not make_plan(NET, Target.cpu(precision=DynamicInt8())).calibrate  # no .npz given
    assert make_plan(NET, Target.cpu(precision=DynamicInt8()), calibration="x.npz").calibrate


def test_models_built_low_rank_are_compared_with_their_baseline() -> None:
    design = ModelFacts("lrt", "pickle", False, True, design_layers=3, by_design=True)
    plan = make_plan(design, Target.cpu())
    assert plan.by_design and plan.models == ()
    alone = ModelFacts("lrt", "pt2", False, False, design_layers=3)
    assert make_plan(alone, Target.cpu()).models == (ModelKind.LRT,)
    assert make_plan(alone, Target.cpu()).is_baseline(ModelKind.LRT)


def test_settings_follow_the_fixed_shape_and_the_maximum_length(caplog) -> None:
    fixed = make_plan(TEXT, Target.mobile(fixed_shape={"batch": 4, "sequence": 64}),
                      settings=BenchmarkSettings(sequence=256))
    assert (fixed.settings.batch, fixed.settings.sequence, fixed.settings.fixed_batch) == (
        4, 64, True)
    with caplog.at_level(logging.WARNING):
        capped = make_plan(TEXT, Target.cpu(), settings=BenchmarkSettings(sequence=256))
    assert capped.settings.sequence == 128 and "maximum length" in caplog.text


@pytest.mark.parametrize(
    ("facts", "target", "choices", "error", "message"),
    [
        (TEXT, Target.cpu(), {"heal": HealConfig(2)}, ConfigError, "needs a factorization"),
        (TEXT, Target.cpu(), {"heal": HealConfig(2, quantized=True)}, ConfigError,
         "HealConfig.quantized=True simulates"),
        (TEXT, Target.mobile(fixed_shape={"sequence": 1024}), {}, ConfigError,
         "Target.fixed_shape sequence=1024 exceeds the 512 positions"),
        (GRAPH, Target.cpu(), {"compress": LowRankConfig(rank=0.5)}, UnsupportedOperationError,
         "factorizing needs an nn.Module"),
    ],
)
def test_impossible_choices_are_refused(facts, target, choices, error, message) -> None:
    with pytest.raises(error, match=message):
        make_plan(facts, target, **choices)


def test_a_heal_corpus_needs_a_text_model(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="HealConfig.corpus is text that healing streams"):
        make_plan(NET, Target.cpu(), compress=LowRankConfig(BudgetRank(0.5)),
                  heal=HealConfig(2, corpus=corpus))


def test_benchmark_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match="BenchmarkSettings.runs must be at least 1, got 0"):
        BenchmarkSettings(runs=0)


def test_make_plan_needs_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; import lrt_deploy.plan; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0

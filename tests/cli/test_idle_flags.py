"""Flags that would do nothing are refused, never silently ignored (issue 21, item 7).

lrt-export's quantisation flags all go through one table (``_QUANT_FLAGS`` in
``lrt_deploy/cli.py``); each case here sets one flag where it changes nothing and expects one
line, exit 2, before any model is loaded and with nothing written. ``--fixed-shape`` refuses a
dimension given twice, in one value or across repeats.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from lrt_deploy.cli import export as cli  # noqa: E402

IDLE = [
    (["--quant-format", "qdq"], "--quant-format"),
    (["--quant-format", "dynamic"], "--quant-format"),
    (["--quant-format", "weight-only", "--quantize", "none"], "--quant-format"),
    (["--quant-format", "qdq", "--quantize", "int4"], "--quant-format"),
    (["--per-tensor"], "--per-tensor"),
    (["--per-tensor", "--quantize", "int4"], "--per-tensor"),
    (["--per-tensor", "--quantize", "int8", "--quant-format", "weight-only"], "--per-tensor"),
    (["--exclude-sensitive", "2", "--quantize", "int4"], "--exclude-sensitive"),
    (["--no-smoothing", "--quantize", "int8", "--quant-format", "qdq"], "--no-smoothing"),
    (["--int8-weights", "full-range", "--quantize", "int4"], "--int8-weights"),
    (["--int4-block", "64", "--quantize", "int8"], "--int4-block"),
]


def _export(argv: list, capsys) -> tuple[int, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _one_line(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrt-export: error: "), err
    return lines[0]


@pytest.mark.parametrize(("flags", "flag"), IDLE)
def test_a_flag_that_does_nothing_is_refused(tmp_path: Path, tiny_bert_dir: Path, capsys,
                                             flags: list[str], flag: str) -> None:
    began = time.perf_counter()
    code, err = _export([tiny_bert_dir, *flags, "-q", "-o", tmp_path / "out"], capsys)
    line = _one_line(code, err)
    assert flag in line and ("drop" in line or "add" in line), line
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert time.perf_counter() - began < 10, "refused only after loading the model"


def test_every_quantisation_flag_is_in_the_table_and_tested() -> None:
    table = {flag for flag, *_ in cli._QUANT_FLAGS}
    assert table == {flag for _, flag in IDLE}
    group = next(g for g in cli.build_parser()._action_groups if g.title == "export")
    quant_options = {o for a in group._group_actions for o in a.option_strings
                     if any(word in o for word in ("quant", "int8", "int4", "per-tensor",
                                                   "smoothing", "sensitive"))}
    assert quant_options - {"--quantize"} <= table


@pytest.mark.parametrize("argv", [
    ["--fixed-shape", "batch=1,batch=2"],
    ["--fixed-shape", "sequence=16, sequence=16"],
    ["--fixed-shape", "batch=1", "--fixed-shape", "sequence=16,batch=4"],
])
def test_a_fixed_shape_dimension_given_twice_is_refused(tmp_path: Path, capsys,
                                                        argv: list[str]) -> None:
    code, err = _export([tmp_path / "model.pt", *argv, "-o", tmp_path / "out"], capsys)
    assert "twice" in _one_line(code, err)
    assert list(tmp_path.iterdir()) == []


def test_repeated_fixed_shape_options_merge() -> None:
    args = cli.build_parser().parse_args(
        ["m", "--fixed-shape", "batch=1", "--fixed-shape", "sequence=16"])
    assert args.fixed_shape == {"batch": 1, "sequence": 16}
    assert cli.build_parser().parse_args(["m"]).fixed_shape is None


def test_argparse_errors_are_one_line(capsys) -> None:
    code, err = _export(["m", "--quantize", "int3"], capsys)
    assert "--quantize" in _one_line(code, err)

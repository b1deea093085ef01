"""Sizes and counts are bounded by what the model and the machine allow, before any work
(issue 21, item 3): thread counts, batch x sequence, a TextEncoder's lengths. (lrt-export's
own --threads/--batch/--sequence have fixed caps in its argument checks, tested in test_cli.)

Every command and the runtime go through :mod:`lrt_deploy.runtime.limits`; the cases below
come in through the public entry points (``Session``, ``TextEncoder``, ``lrt-bench``). The
ones that crashed the process before run in a child process under the report's limits
(``ulimit -v 4 GB``), so a regression fails the test instead of killing the test run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from test_bundle_integrity import _bench, _one_line_error, _run  # noqa: E402
from test_runtime_hardening import _bundle  # noqa: E402

from lrt_deploy.cli.bench import main as bench_main  # noqa: E402
from lrt_deploy.errors import LrtDeployError  # noqa: E402
from lrt_deploy.runtime import (  # noqa: E402
    ResourceLimitError,
    Session,
    TextEncoder,
    limits,  # noqa: E402
)

REPO = Path(__file__).resolve().parents[2]
GiB = 2**30


def _child(code: str, *, address_space: int | None = 4 * GiB,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python under ``ulimit -v``; a crash is a negative returncode."""

    def limit() -> None:
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=timeout, preexec_fn=limit, check=False)


def _refused_in_child(code: str) -> str:
    """``code`` must raise an LrtDeployError (printed as 'REFUSED: ...'), not crash."""
    wrapped = ("from lrt_deploy.errors import LrtDeployError\n"
               f"try:\n    {code}\nexcept LrtDeployError as error:\n"
               "    print('REFUSED:', error)\nelse:\n    print('ACCEPTED')\n")
    done = _child(wrapped)
    assert done.returncode == 0, f"crashed ({done.returncode}): {done.stderr[-2000:]}"
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("REFUSED: "), done.stdout + done.stderr
    return line


# --- threads ------------------------------------------------------------------------------------


def test_thread_limit_follows_the_cpus() -> None:
    most, why = limits.thread_limit()
    assert most == min(4 * limits.usable_cpus(), limits.MAX_THREADS) or "ulimit" in why
    assert 1 <= most <= limits.MAX_THREADS


def test_thread_limit_follows_the_process_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (10, hard))
    try:
        most, why = limits.thread_limit()
        with pytest.raises(ResourceLimitError, match="ulimit -u 10"):
            limits.check_threads(most + 1)
    finally:
        resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
    assert most <= 5 and "ulimit -u 10" in why


@pytest.mark.parametrize("threads", [100_000, 1_000_000])
def test_session_refuses_threads_beyond_the_machine_under_4gb(tmp_path: Path,
                                                              threads: int) -> None:
    # Before: a segfault (thread stacks beyond the address space), in onnxruntime.
    bundle = _bundle(tmp_path / "bundle")
    line = _refused_in_child(
        f"from lrt_deploy.runtime import Session; Session({str(bundle)!r}, threads={threads})")
    most, _ = limits.thread_limit()
    assert f"threads={threads} is more than this machine allows" in line
    assert "(" in line and "use threads=" in line


@pytest.mark.parametrize("threads", [0, -1, True, 2.0, "4"])
def test_session_refuses_threads_that_are_not_counts(tmp_path: Path, threads) -> None:
    bundle = _bundle(tmp_path / "bundle")
    with pytest.raises(ResourceLimitError, match="threads must be"):
        Session(bundle, threads=threads)


def test_session_accepts_threads_within_the_limit(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")
    most, _ = limits.thread_limit()
    Session(bundle, threads=min(most, 4))


@pytest.mark.parametrize("sweep", ["100000", "1,100000"])
def test_bench_refuses_threads_before_benchmarking(tmp_path: Path, sweep: str) -> None:
    bundle = _bundle(tmp_path / "bundle")
    code, out, err = _run(bench_main, [bundle, "--sequence", "4", "--runs", "2",
                                       "--no-memory", "--threads", sweep])
    line = _one_line_error(code, err, "lrt-bench")  # no progress line: nothing ran
    most, _ = limits.thread_limit()
    assert f"--threads=100000 is more than this machine allows ({most}:" in line
    assert out == ""


def test_bench_api_refuses_threads_before_opening(tmp_path: Path) -> None:
    from lrt_deploy.runtime import benchmark_bundles

    with pytest.raises(ResourceLimitError, match="threads=100000"):
        benchmark_bundles([tmp_path / "does-not-exist"], threads=[1, 100_000], memory=False)


# --- batch x sequence ----------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", [False, True])
def test_bench_batch_times_sequence_is_bounded_by_memory(tmp_path: Path, tiny_bert_dir: Path,
                                                         tokenizer: bool) -> None:
    # Before: with a tokenizer, a million texts of a million tokens were tokenized (a hang).
    bundle = _bundle(tmp_path / "bundle",
                     tokenizer=tiny_bert_dir / "tokenizer.json" if tokenizer else None)
    code, out, err = _run(bench_main, [bundle, "--batch", "1000000", "--sequence", "1000000",
                                       "--runs", "2", "--no-memory"])
    line = _one_line_error(code, err, "lrt-bench")
    free, source = limits.available_memory()
    assert "a run of batch 1000000 x sequence 1000000 needs at least" in line
    assert f"are available ({source})" in line and "smaller --batch/--sequence" in line
    assert out == ""


def test_bench_checks_every_shape_before_the_first_runs(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")
    free, _ = limits.available_memory()
    huge = free // (4 * 8) + 1  # feeds alone: 2 int64 inputs x 4 tokens per row
    code, out, err = _run(bench_main, [bundle, "--batch", f"1,{huge}", "--sequence", "4",
                                       "--runs", "2", "--no-memory"])
    line = _one_line_error(code, err, "lrt-bench")  # no "warming up" line for batch 1
    assert f"batch {huge} x sequence 4" in line


def test_session_refuses_a_run_whose_outputs_exceed_memory(tmp_path: Path) -> None:
    session = Session(_bundle(tmp_path / "bundle"))
    free, _ = limits.available_memory()
    tokens = free // 4 + 1  # the output holds >= 4 bytes per token; the feed is a view
    ids = np.broadcast_to(np.int64(1), (1, tokens))
    with pytest.raises(ResourceLimitError, match="outputs of this run needs at least"):
        session.prepare({"input_ids": ids, "attention_mask": ids})
    with pytest.raises(ResourceLimitError, match="batch 1 x sequence"):
        session.check_run_size(1, tokens)
    session.check_run_size(2, 8)


# --- TextEncoder lengths ------------------------------------------------------------------------


def _text_bundle(folder: Path, tokenizer: Path, max_sequence: int = 512) -> Path:
    return _bundle(folder, text={"vocab_size": 30522, "max_sequence": max_sequence},
                   tokenizer=tokenizer)


def test_text_encoder_huge_lengths_are_refused_not_allocated(tmp_path: Path,
                                                             tiny_bert_dir: Path) -> None:
    # Before: the tokenizer allocated 40 GB and the process aborted.
    bundle = _text_bundle(tmp_path / "bundle", tiny_bert_dir / "tokenizer.json")
    line = _refused_in_child(
        "from lrt_deploy.runtime import TextEncoder; "
        f"TextEncoder.from_bundle({str(bundle)!r}, max_length=10**10, pad_to=10**10)")
    assert "pad_to=10000000000 is more than the model's 512 positions" in line
    assert "use pad_to=512 or less" in line
    tokenizer = str(tiny_bert_dir / "tokenizer.json")
    line = _refused_in_child(
        "from lrt_deploy.runtime import TextEncoder; "
        f"TextEncoder({tokenizer!r}, max_length=10**10, pad_to=10**10)")
    assert "pad_to=10000000000 is more than the 2147483647 tokens" in line
    line = _refused_in_child(  # within the tokenizer's sizes, beyond this machine's memory
        "from lrt_deploy.runtime import TextEncoder; "
        f"TextEncoder({tokenizer!r}, max_length=10**9, pad_to=10**9)")
    assert "pad_to=1000000000 needs at least 59.6 GiB but" in line and "available" in line


@pytest.mark.parametrize(("max_length", "pad_to", "expected"), [
    (513, None, "max_length=513 is more than the model's 512 positions"),
    (None, 600, "pad_to=600 is more than the model's 512 positions"),
    (64, 65, "pad_to=65 is longer than max_length=64"),
    (0, None, "max_length must be a whole number >= 1"),
    (128, -1, "pad_to must be a whole number >= 1"),
    ("128", None, "max_length must be a whole number >= 1"),
    (2**40, None, "max_length=1099511627776 is more than the model's 512 positions"),
])
def test_text_encoder_lengths_within_the_model(tmp_path: Path, tiny_bert_dir: Path,
                                               max_length, pad_to, expected: str) -> None:
    bundle = _text_bundle(tmp_path / "bundle", tiny_bert_dir / "tokenizer.json")
    with pytest.raises(LrtDeployError, match="^" + expected.replace("(", r"\(")):
        TextEncoder.from_bundle(bundle, max_length=max_length, pad_to=pad_to)


def test_text_encoder_default_length_fits_the_model(tmp_path: Path,
                                                    tiny_bert_dir: Path) -> None:
    bundle = _text_bundle(tmp_path / "bundle", tiny_bert_dir / "tokenizer.json", 64)
    encoder = TextEncoder.from_bundle(bundle)
    assert encoder.max_length == 64  # not 128: the model has 64 positions
    assert TextEncoder.from_bundle(bundle, pad_to=32).max_length == 32
    ids = encoder.encode("word " * 500)["input_ids"]
    assert ids.shape == (1, 64)
    Session(bundle).prepare({"input_ids": ids % 10, "attention_mask": np.ones_like(ids)})


def test_bench_json_records_the_shape_it_refused_nothing(tmp_path: Path) -> None:
    # The bounds refuse only what cannot fit: an ordinary sweep still runs.
    bundle = _bundle(tmp_path / "bundle", text={"vocab_size": 10, "max_sequence": 64})
    code, _, err = _bench(bundle, "--batch", "1,2", "--sequence", "4",
                          "--threads", "1,2", "--json", tmp_path / "b.json")
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["settings"]["threads"] == [1, 2]

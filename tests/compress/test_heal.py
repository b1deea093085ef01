from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lrt_deploy.compress import HealResult, LowRankConfig, factorize_, heal_
from lrt_deploy.compress.calibration import primary_output
from lrt_deploy.nn import LowRankLinear

DIM = 16


class Teacher(nn.Module):
    def __init__(self, dict_output: bool = False) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(DIM, 48), nn.GELU(), nn.Linear(48, DIM))
        self.head = nn.Linear(DIM, DIM)
        self.dict_output = dict_output

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        out = self.head(torch.tanh(self.block(x)))
        return {"embedding": out, "other": out * 0} if self.dict_output else out


def _pair(dict_output: bool = False) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = Teacher(dict_output).eval()
    student = copy.deepcopy(teacher)
    factorize_(student, LowRankConfig(rank=3, solver="svd"), filter_fn=lambda m, n: "block" in n)
    return student, teacher


def _batches(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(32, DIM, generator=generator)} for _ in range(count)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_heal_improves_and_trains_only_lowrank_factors() -> None:
    student, teacher = _pair()
    head_before = student.head.weight.clone()
    result = heal_(
        student,
        teacher,
        _batches(0, 8),
        steps=60,
        lr=3e-3,
        eval_batches=_batches(1, 2),
        eval_every=10,
        progress=False,
    )
    assert isinstance(result, HealResult)
    assert result.after_mean_cosine > result.before_mean_cosine + 0.01
    assert result.after_worst_cosine >= result.before_worst_cosine
    assert result.improved and result.best_step > 0 and result.steps_run == 60
    assert [h["step"] for h in result.history] == [10, 20, 30, 40, 50, 60]
    assert torch.equal(student.head.weight, head_before)  # dense layers stay the teacher's
    assert isinstance(student.block[0], LowRankLinear)
    assert all(p.requires_grad for p in student.parameters())  # flags restored
    assert "best at step" in result.summary()


def test_heal_never_regresses_when_training_diverges() -> None:
    student, teacher = _pair()
    initial = _state(student)
    result = heal_(
        student,
        teacher,
        _batches(0, 4),
        steps=20,
        lr=1e6,
        trainable="all",
        eval_batches=_batches(1, 1),
        eval_every=5,
        progress=False,
    )
    assert result.best_step == 0 and not result.improved
    assert result.after_mean_cosine == result.before_mean_cosine
    for name, value in _state(student).items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)
    assert "initial weights kept" in result.summary()


def test_heal_stops_on_non_finite_loss() -> None:
    student, teacher = _pair()
    initial = _state(student)
    batches = [{"x": torch.full((4, DIM), float("nan"))}]
    result = heal_(student, teacher, batches, steps=5, eval_batches=_batches(1, 1), progress=False)
    assert result.steps_run == 0 and result.stopped_early.startswith("loss became nan")
    for name, value in _state(student).items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)


def test_heal_dict_outputs_holders_and_hidden_states() -> None:
    student, teacher = _pair(dict_output=True)
    holder = SimpleNamespace(module=student)  # LoadedModel-like
    result = heal_(
        holder,
        SimpleNamespace(module=teacher),
        _batches(0, 4),
        steps=30,
        lr=3e-3,
        eval_batches=_batches(1, 1),
        hidden_modules=["block"],
        progress=False,
    )
    assert result.after_mean_cosine >= result.before_mean_cosine
    assert result.improved
    assert result.to_dict()["steps_run"] == 30


def test_heal_argument_errors() -> None:
    torch.manual_seed(0)
    dense = Teacher()
    with pytest.raises(ValueError, match="no low-rank units"):
        heal_(copy.deepcopy(dense), dense, _batches(0, 1), steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be"):
        heal_(copy.deepcopy(dense), dense, _batches(0, 1), steps=0, progress=False)
    with pytest.raises(ValueError, match="trainable must be"):
        heal_(dense, dense, _batches(0, 1), steps=1, trainable="some", progress=False)
    with pytest.raises(TypeError, match="student must be"):
        heal_(object(), dense, _batches(0, 1), steps=1, progress=False)


def test_primary_output_rules() -> None:
    tensor = torch.ones(2)
    assert primary_output(tensor) is tensor
    assert primary_output({"a": tensor, "b": tensor * 2}) is tensor
    assert primary_output((tensor, tensor * 2)) is tensor
    assert primary_output(SimpleNamespace(last_hidden_state=tensor)) is tensor
    with pytest.raises(TypeError, match="primary output"):
        primary_output("text")


# --- healing at scale: streaming, device, schedule -------------------------------------------


def _tokenize(lines: list[str]) -> dict[str, torch.Tensor]:
    # A deterministic stand-in for a tokenizer: each line becomes one DIM-vector.
    rows = []
    for line in lines:
        generator = torch.Generator().manual_seed(sum(map(ord, line)) * 31 + len(line))
        rows.append(torch.randn(DIM, generator=generator))
    return {"x": torch.stack(rows)}


def _corpus(tmp_path, lines: int = 10_000):  # noqa: ANN001, ANN202
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"sentence number {i}\n\n" if i % 7 == 0 else f"sentence number {i}\n"
                            for i in range(lines)), encoding="utf-8")
    return path


def test_stream_reads_lazily_and_holds_back_the_head(tmp_path) -> None:  # noqa: ANN001
    from itertools import islice

    from lrt_deploy.data.stream import StreamingTextBatches, read_head

    path = _corpus(tmp_path)
    stream = StreamingTextBatches(path, _tokenize, batch_size=4, shuffle_buffer=16,
                                  holdout_lines=8, seed=0)
    batches = list(islice(iter(stream), 3))
    assert [b["x"].shape for b in batches] == [(4, DIM)] * 3
    # 16 lines fill the buffer, then one line per emitted line: far from the 10,000 lines.
    assert stream.lines_read <= 16 + 12
    assert read_head(path, 3) == ["sentence number 0", "sentence number 1", "sentence number 2"]

    small = tmp_path / "small.txt"
    small.write_text("\n".join(f"line {i}" for i in range(40)) + "\n", encoding="utf-8")
    seen: list[str] = []
    shuffled = StreamingTextBatches(small, lambda lines: seen.extend(lines) or _tokenize(lines),
                                    batch_size=5, shuffle_buffer=10, holdout_lines=8, seed=1)
    assert len(list(shuffled)) == 32 // 5  # drop_last
    assert not set(seen) & set(read_head(small, 8))  # held-back lines never trained on
    assert seen != sorted(seen, key=lambda s: int(s.split()[1]))  # shuffled within the buffer
    assert shuffled.passes == 1 and shuffled.lines_read == 32

    from lrt_deploy.data.stream import healing_data

    stream, selection = healing_data(path, _tokenize, holdback_lines=10, batch_size=4)
    assert [b["x"].shape[0] for b in selection] == [4, 4, 2]
    assert stream.holdout_lines == 10 and stream.lines_read == 0  # nothing read yet


def test_stream_errors(tmp_path) -> None:  # noqa: ANN001
    from lrt_deploy.data.stream import StreamingTextBatches
    from lrt_deploy.errors import LrtDeployError

    with pytest.raises(LrtDeployError, match="does not exist"):
        StreamingTextBatches(tmp_path / "missing.txt", _tokenize)
    short = tmp_path / "short.txt"
    short.write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(LrtDeployError, match="no training lines"):
        list(StreamingTextBatches(short, _tokenize, batch_size=4, holdout_lines=1))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(LrtDeployError, match="line 2 is not UTF-8"):
        list(StreamingTextBatches(bad, _tokenize, batch_size=1))


def test_heal_on_a_stream_computes_targets_on_the_fly(tmp_path) -> None:  # noqa: ANN001
    from lrt_deploy.data.stream import StreamingTextBatches

    student, teacher = _pair()
    calls = {"n": 0}

    def counting_teacher(**inputs: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return teacher(**inputs)

    stream = StreamingTextBatches(_corpus(tmp_path, 400), _tokenize, batch_size=16,
                                  shuffle_buffer=64, holdout_lines=64, seed=0)
    held = [_tokenize([f"sentence number {i}" for i in range(64)])]
    result = heal_(student, counting_teacher, stream, steps=40, lr=3e-3, eval_batches=held,
                   eval_every=10, device="cpu", progress=False)
    # One teacher call for the held-back references, then one per step: nothing cached.
    assert calls["n"] == 1 + 40
    assert stream.passes == 2  # 336 training lines = 21 batches: the stream restarted once
    assert result.after_mean_cosine >= result.before_mean_cosine  # never worse
    assert result.device == "cpu" and result.precision == "fp32"
    with pytest.raises(ValueError, match="needs eval_batches"):
        heal_(student, teacher, stream, steps=1, progress=False)


def test_heal_one_shot_iterator_that_runs_dry_stops_early() -> None:
    student, teacher = _pair()
    result = heal_(student, teacher, iter(_batches(0, 3)), steps=10, lr=3e-3,
                   eval_batches=_batches(1, 1), progress=False)
    assert result.steps_run == 3 and "ran out after 3 steps" in result.stopped_early
    assert result.after_mean_cosine >= result.before_mean_cosine


def test_lr_schedule_warms_up_then_decays_along_a_cosine() -> None:
    from lrt_deploy.compress.heal import lr_multiplier

    values = [lr_multiplier(step, 110, 10) for step in range(1, 111)]
    assert values[:10] == pytest.approx([i / 10 for i in range(1, 11)])
    assert values[59] == pytest.approx(0.5)  # half way through the decay
    assert values[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False))
    assert lr_multiplier(110, 110, 10, final_fraction=0.1) == pytest.approx(0.1)
    assert lr_multiplier(5, 5, 10) == pytest.approx(0.5)  # all warm-up
    # The optimiser really follows it: the lr logged at each evaluation.
    student, teacher = _pair()
    result = heal_(student, teacher, _batches(0, 4), steps=40, lr=1e-3, warmup_steps=8,
                   eval_batches=_batches(1, 1), eval_every=4, progress=False)
    for entry in result.history:
        expected = 1e-3 * lr_multiplier(int(entry["step"]) + 1, 40, 8)
        assert entry["lr"] == pytest.approx(expected)


def test_device_selection() -> None:
    from lrt_deploy.compress.heal import autocast_dtype, select_device
    from lrt_deploy.errors import LrtDeployError

    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected and select_device(None).type == expected
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype(torch.device("cpu"), "int4")
    with pytest.raises(LrtDeployError, match="unknown device"):
        select_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(LrtDeployError, match="no CUDA GPU"):
            select_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_heal_on_cuda_with_autocast_returns_the_model_to_its_device() -> None:
    student, teacher = _pair()
    result = heal_(student, teacher, _batches(0, 4), steps=30, lr=3e-3, device="cuda",
                   eval_batches=_batches(1, 1), progress=False)
    assert result.device.startswith("cuda") and result.precision in ("bfloat16", "float16")
    assert next(student.parameters()).device.type == "cpu"
    assert next(teacher.parameters()).device.type == "cpu"
    assert result.after_mean_cosine >= result.before_mean_cosine


def test_lowrank_factors_round_trip_in_small_shards(tmp_path) -> None:  # noqa: ANN001
    from lrt_deploy.compress.factor_shards import load_lowrank_factors, save_lowrank_factors

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Embedding(300, DIM), nn.Linear(DIM, 48), nn.Linear(48, DIM))
    factored = copy.deepcopy(dense)
    factorize_(factored, LowRankConfig(rank=4, solver="svd", factorize_embeddings=True))
    paths = save_lowrank_factors(factored, tmp_path, dtype=torch.float32, max_file_bytes=2048)
    assert len(paths) > 2 and all(p.stat().st_size < 2048 + 1024 for p in paths)
    units = load_lowrank_factors(dense, tmp_path)
    assert {u["name"] for u in units} == {"0", "1", "2"}
    ids = torch.randint(0, 300, (3, 5))
    torch.testing.assert_close(dense(ids), factored(ids))
    with pytest.raises(ValueError, match="no low-rank units"):
        save_lowrank_factors(nn.Linear(2, 2), tmp_path / "none")


def test_text_healing_data_selects_on_the_shipped_corpus_unless_it_is_trained_on(
    tmp_path, tiny_bert_dir  # noqa: ANN001
) -> None:
    from lrt_deploy.compress.recipe import HOLDBACK_LINES, text_healing_data
    from lrt_deploy.data.stream import shipped_lines
    from lrt_deploy.load import load_model

    loaded = load_model(str(tiny_bert_dir))
    shipped = shipped_lines("calibration.txt")
    own = tmp_path / "own.txt"
    own.write_text("\n".join(f"sentence number {i} about rivers" for i in range(600)),
                   encoding="utf-8")
    data = text_healing_data(loaded, own, batch_size=16)
    assert data.selection_data == "the shipped calibration.txt (never trained on)"
    assert sum(len(b["input_ids"]) for b in data.selection) == len(shipped)
    assert data.train.holdout_lines == 0
    batches = list(data.train)
    assert len(batches) == 600 // 16 and data.to_dict()["lines_read"] == 600
    # A corpus that contains the shipped sentences would train on them: hold back its head.
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("\n".join(shipped + [f"extra line {i}" for i in range(400)]),
                     encoding="utf-8")
    data = text_healing_data(loaded, mixed, batch_size=16)
    assert data.selection_data.startswith(f"the first {HOLDBACK_LINES} lines of mixed.txt")
    assert data.train.holdout_lines == HOLDBACK_LINES
    assert sum(len(b["input_ids"]) for b in data.selection) == HOLDBACK_LINES


def test_calibration_batches_read_only_the_head_of_a_large_file(
    tmp_path, tiny_bert_dir  # noqa: ANN001
) -> None:
    from lrt_deploy.data.readers import DOMAIN_HELDOUT_TEXT, calibration_batches, evaluation_batches
    from lrt_deploy.load import load_model

    loaded = load_model(str(tiny_bert_dir))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}" for i in range(1000)) + "\n\xff broken tail\n",
                      encoding="latin-1")  # the tail is not UTF-8: reading it all would fail
    batches = calibration_batches(loaded, corpus, batch_size=16, max_lines=100)
    assert sum(len(b["input_ids"]) for b in batches) == 100
    domain = evaluation_batches(loaded, 16, corpus=DOMAIN_HELDOUT_TEXT)
    heldout = evaluation_batches(loaded, 16)
    assert not torch.equal(domain[0]["input_ids"], heldout[0]["input_ids"])

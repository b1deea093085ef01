"""Tests for lrt_deploy.runtime on tiny ONNX graphs built in code."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lrt_deploy.errors import BundleError  # noqa: E402
from lrt_deploy.runtime import (  # noqa: E402
    NO_SPINNING,
    InputError,
    LatencyStats,
    ProviderResolution,
    Schedule,
    Session,
    TextEncoder,
    UnknownTargetError,
    peak_rss_mb,
    providers_for_target,
    resolve_providers,
    runner,
    time_runs,
)

VOCAB, HIDDEN, OUT = 10, 8, 4
RNG = np.random.default_rng(0)
EMBEDDING = RNG.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
TYPE_EMBEDDING = RNG.standard_normal((2, HIDDEN)).astype(np.float32)
WEIGHT = RNG.standard_normal((HIDDEN, OUT)).astype(np.float32)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_encoder(path: Path, *, token_types: bool = False, fixed: tuple[int, int] | None = None):
    """input_ids -> embedding (+ token-type embedding) -> MatMul -> * attention_mask."""
    dims = list(fixed) if fixed else ["batch", "sequence"]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dims),
    ]
    initializers = [
        numpy_helper.from_array(EMBEDDING, "embedding"),
        numpy_helper.from_array(WEIGHT, "weight"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
    ]
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"])]
    hidden = "embedded"
    if token_types:
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, dims))
        initializers.append(numpy_helper.from_array(TYPE_EMBEDDING, "type_embedding"))
        nodes += [
            helper.make_node("Gather", ["type_embedding", "token_type_ids"], ["typed"]),
            helper.make_node("Add", ["embedded", "typed"], ["summed"]),
        ]
        hidden = "summed"
    nodes += [
        helper.make_node("MatMul", [hidden, "weight"], ["projected"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_float", "last_axis"], ["mask_3d"]),
        helper.make_node("Mul", ["projected", "mask_3d"], ["hidden_states"]),
    ]
    output = helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [*dims, OUT])
    graph = helper.make_graph(nodes, "tiny_encoder", inputs, [output], initializers)
    return _save(graph, path)


def reference(input_ids, attention_mask, token_type_ids=None):
    hidden = EMBEDDING[input_ids]
    if token_type_ids is not None:
        hidden = hidden + TYPE_EMBEDDING[token_type_ids]
    return (hidden @ WEIGHT) * attention_mask[..., None].astype(np.float32)


def build_scaler(path: Path) -> Path:
    """x (float32 [batch, 3]) -> 2 * x."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "scaler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
    )
    return _save(graph, path)


def write_bundle(folder: Path, model_name: str, providers: list[str]) -> Path:
    manifest = {
        "format_version": 1,
        "tool": {"name": "lrt-deploy", "version": "0.1.0"},
        "target": {"name": "mobile", "providers": providers},
        "files": {"model": model_name, "onnx": "model.onnx"},
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
        ],
        "outputs": [
            {"name": "hidden_states", "dtype": "float32", "shape": ["batch", "sequence", OUT]}
        ],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.fixture()
def encoder_path(tmp_path: Path) -> Path:
    return build_encoder(tmp_path / "model.onnx")


@pytest.fixture()
def feeds() -> dict[str, np.ndarray]:
    ids = np.array([[1, 2, 3, 0], [4, 5, 0, 0]], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}


# --- providers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "platform", "expected"),
    [
        ("cpu", None, ["CPUExecutionProvider"]),
        ("cuda", None, ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (
            "mobile",
            "android",
            ["NnapiExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"],
        ),
        (
            "mobile",
            "ios",
            ["CoreMLExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"],
        ),
        (
            "mobile",
            "darwin",
            ["CoreMLExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"],
        ),
        ("mobile", "linux", ["XnnpackExecutionProvider", "CPUExecutionProvider"]),
    ],
)
def test_providers_for_target(target, platform, expected):
    assert providers_for_target(target, platform) == expected


def test_providers_for_cuda_with_tensorrt():
    assert providers_for_target("cuda", tensorrt=True) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_unknown_target_lists_valid_targets():
    with pytest.raises(UnknownTargetError, match="cpu, cuda, mobile") as info:
        providers_for_target("tpu")
    assert isinstance(info.value, ValueError)


def test_resolve_providers_reports_fallback(caplog):
    with caplog.at_level(logging.WARNING):
        resolution = resolve_providers(["XNNPACKExecutionProvider", "CPUExecutionProvider"])
    assert isinstance(resolution, ProviderResolution)
    # Spelling is normalised to onnxruntime's own.
    assert resolution.missing == ["XnnpackExecutionProvider"]
    assert resolution.used == ["CPUExecutionProvider"]
    assert resolution.fell_back
    assert resolution.message.startswith(
        "XnnpackExecutionProvider is not in this onnxruntime build (available: "
    )
    assert resolution.message.endswith("; running on CPUExecutionProvider")
    assert "XnnpackExecutionProvider is not in this onnxruntime build" in caplog.text


def test_resolve_providers_without_fallback_is_quiet(caplog):
    with caplog.at_level(logging.WARNING):
        resolution = resolve_providers(["CPUExecutionProvider"])
    assert not resolution.fell_back and resolution.missing == []
    assert resolution.used == ["CPUExecutionProvider"]
    assert caplog.text == ""


# --- session ---------------------------------------------------------------------------------


def test_session_matches_numpy_reference(encoder_path, feeds):
    session = Session(encoder_path)
    outputs = session.run(feeds)
    assert list(outputs) == ["hidden_states"]
    np.testing.assert_allclose(outputs["hidden_states"], reference(**feeds), rtol=1e-5, atol=1e-6)
    assert session.manifest is None
    assert session.active_providers == ["CPUExecutionProvider"]


def test_session_describes_inputs_and_outputs(encoder_path):
    session = Session(encoder_path)
    assert [spec.to_dict() for spec in session.inputs] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
    ]
    assert session.outputs[0].to_dict() == {
        "name": "hidden_states",
        "dtype": "float32",
        "shape": ["batch", "sequence", OUT],
    }


def test_bundle_with_mobile_target_falls_back_to_cpu(tmp_path, feeds, caplog):
    build_encoder(tmp_path / "model.onnx")
    write_bundle(tmp_path, "model.onnx", ["XNNPACKExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="lrt_deploy.runtime"):
        session = Session(tmp_path)
    report = session.provider_report()
    assert report["requested"] == ["XnnpackExecutionProvider", "CPUExecutionProvider"]
    assert report["missing"] == ["XnnpackExecutionProvider"]
    assert report["active"] == ["CPUExecutionProvider"]
    assert report["fell_back"] is True
    assert "running on CPUExecutionProvider" in report["message"]
    assert report["available"] == ort.get_available_providers()
    assert any(r.levelno == logging.WARNING and "Xnnpack" in r.message for r in caplog.records)
    assert session.manifest["target"]["name"] == "mobile"
    np.testing.assert_allclose(session.run(feeds)["hidden_states"], reference(**feeds), atol=1e-5)


def test_target_argument_overrides_manifest(tmp_path, caplog):
    build_encoder(tmp_path / "model.onnx")
    write_bundle(tmp_path, "model.onnx", ["XnnpackExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING):
        session = Session(tmp_path, target="mobile", threads=1)
    assert "XnnpackExecutionProvider" in session.provider_report()["requested"]
    with caplog.at_level(logging.WARNING):
        cpu_session = Session(tmp_path, target="cpu")
    assert cpu_session.provider_report()["fell_back"] is False


def test_explicit_providers_win(tmp_path, caplog):
    build_encoder(tmp_path / "model.onnx")
    write_bundle(tmp_path, "model.onnx", ["XnnpackExecutionProvider", "CPUExecutionProvider"])
    session = Session(tmp_path, target="mobile", providers=["CPUExecutionProvider"])
    report = session.provider_report()
    assert report["requested"] == ["CPUExecutionProvider"]
    assert report["fell_back"] is False and report["missing"] == []
    assert "not in this onnxruntime build" not in caplog.text


def test_unknown_target_in_session(encoder_path):
    with pytest.raises(UnknownTargetError):
        Session(encoder_path, target="quantum")


def test_missing_path_and_manifest(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Session(tmp_path / "nope.onnx")
    with pytest.raises(BundleError, match="manifest.json"):
        Session(tmp_path)


def test_session_options(encoder_path, feeds):
    session = Session(encoder_path, threads=1, optimization_level="disable")
    assert session.run(feeds)["hidden_states"].shape == (2, 4, OUT)
    with pytest.raises(ValueError, match="threads"):
        Session(encoder_path, threads=0)
    with pytest.raises(ValueError, match="optimization_level"):
        Session(encoder_path, optimization_level="maximum")


def test_output_names(encoder_path, feeds):
    session = Session(encoder_path)
    assert list(session.run(feeds, output_names=["hidden_states"])) == ["hidden_states"]
    with pytest.raises(ValueError, match="unknown output"):
        session.run(feeds, output_names=["logits"])


# --- input checks ----------------------------------------------------------------------------


def test_missing_input(encoder_path, feeds):
    with pytest.raises(InputError, match="missing input.*'attention_mask'"):
        Session(encoder_path).run({"input_ids": feeds["input_ids"]})


def test_unexpected_input(encoder_path, feeds):
    with pytest.raises(InputError, match="unexpected input.*'pixel_values'"):
        Session(encoder_path).run({**feeds, "pixel_values": np.zeros((1, 3))})


def test_wrong_rank(encoder_path):
    ids = np.array([1, 2, 3], dtype=np.int64)
    with pytest.raises(InputError, match="rank 1 .* rank 2") as info:
        Session(encoder_path).run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert "\n" not in str(info.value)


def test_shared_dimensions_must_agree(encoder_path):
    ids = np.ones((2, 5), dtype=np.int64)
    with pytest.raises(InputError, match="sequence=4 but input 'input_ids' has sequence=5"):
        Session(encoder_path).run({"input_ids": ids, "attention_mask": np.ones((2, 4), np.int64)})
    with pytest.raises(InputError, match="batch=1 but input 'input_ids' has batch=2"):
        Session(encoder_path).run({"input_ids": ids, "attention_mask": np.ones((1, 5), np.int64)})


def test_fixed_shape_mismatch(tmp_path):
    session = Session(build_encoder(tmp_path / "fixed.onnx", fixed=(1, 8)))
    ids = np.ones((1, 6), dtype=np.int64)
    message = (
        "input 'input_ids' has shape (1, 6) but the model was exported with fixed shape (1, 8): "
        "pad/truncate to 8 or re-export without --fixed-shape"
    )
    with pytest.raises(InputError) as info:
        session.run({"input_ids": ids, "attention_mask": ids})
    assert str(info.value) == message
    padded = np.ones((1, 8), dtype=np.int64)
    assert session.run({"input_ids": padded, "attention_mask": padded})["hidden_states"].shape == (
        1,
        8,
        OUT,
    )


@pytest.mark.parametrize("dtype", [np.int32, np.int16, np.uint8, np.uint32])
def test_integer_inputs_are_cast_to_int64(encoder_path, feeds, dtype):
    cast = {name: array.astype(dtype) for name, array in feeds.items()}
    outputs = Session(encoder_path).run(cast)
    np.testing.assert_allclose(outputs["hidden_states"], reference(**feeds), atol=1e-5)


def test_python_lists_are_accepted(encoder_path, feeds):
    as_lists = {name: array.tolist() for name, array in feeds.items()}
    outputs = Session(encoder_path).run(as_lists)
    np.testing.assert_allclose(outputs["hidden_states"], reference(**feeds), atol=1e-5)


def test_unsafe_casts_are_refused(encoder_path, feeds, tmp_path):
    session = Session(encoder_path)
    with pytest.raises(InputError, match=r"dtype float32 but the model expects int64.*astype"):
        session.run({**feeds, "input_ids": feeds["input_ids"].astype(np.float32)})
    with pytest.raises(InputError, match="dtype uint64"):
        session.run({**feeds, "input_ids": feeds["input_ids"].astype(np.uint64)})
    scaler = Session(build_scaler(tmp_path / "scaler.onnx"))
    with pytest.raises(InputError, match="dtype int64 but the model expects float32"):
        scaler.run({"x": np.ones((1, 3), dtype=np.int64)})


def test_float64_is_cast_to_float32(tmp_path):
    scaler = Session(build_scaler(tmp_path / "scaler.onnx"))
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    y = scaler.run({"x": x})["y"]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, 2 * x)


def test_token_type_ids_are_zero_filled(tmp_path, feeds):
    session = Session(build_encoder(tmp_path / "typed.onnx", token_types=True))
    zeros = np.zeros_like(feeds["input_ids"])
    outputs = session.run(feeds)
    np.testing.assert_allclose(
        outputs["hidden_states"], reference(**feeds, token_type_ids=zeros), atol=1e-5
    )
    ones = np.ones_like(feeds["input_ids"])
    explicit = session.run({**feeds, "token_type_ids": ones})
    np.testing.assert_allclose(
        explicit["hidden_states"], reference(**feeds, token_type_ids=ones), atol=1e-5
    )


# --- ORT format ------------------------------------------------------------------------------


def test_ort_format_bundle(tmp_path, feeds):
    onnx_path = build_encoder(tmp_path / "model.onnx")
    ort_path = tmp_path / "model.ort"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(ort_path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    assert ort_path.is_file()

    direct = Session(ort_path)
    np.testing.assert_allclose(direct.run(feeds)["hidden_states"], reference(**feeds), atol=1e-5)

    write_bundle(tmp_path, "model.ort", ["CPUExecutionProvider"])
    bundled = Session(tmp_path)
    assert bundled.model_path == ort_path
    np.testing.assert_allclose(bundled.run(feeds)["hidden_states"], reference(**feeds), atol=1e-5)


# --- benchmark -------------------------------------------------------------------------------


def test_time_runs_one_session(encoder_path, feeds):
    stats = time_runs([runner(Session(encoder_path), feeds)], Schedule(runs=10, warmup=2)).stats()
    assert isinstance(stats, LatencyStats)
    assert stats.runs == 10
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms
    assert stats.mean_ms > 0
    assert set(stats.to_dict()) == {"median_ms", "p90_ms", "mean_ms", "min_ms", "runs"}


def test_time_runs_time_budget_and_raw_session(encoder_path, feeds):
    raw = ort.InferenceSession(str(encoder_path), providers=["CPUExecutionProvider"])
    timings = time_runs([runner(raw, feeds)], Schedule(runs=1000, warmup=0, max_seconds=0.0))
    assert timings.stats().runs == 1 and timings.rounds == 1 and timings.planned_rounds == 1000
    with pytest.raises(ValueError, match="Schedule.runs must be a whole number >= 1"):
        Schedule(runs=0)


class _Recorder:
    """A stand-in InferenceSession: records the order of runs and sleeps ``ms`` per run."""

    def __init__(self, name: str, log: list[str], ms: float) -> None:
        self.name, self.log, self.ms = name, log, ms

    def run(self, output_names, feeds):  # noqa: ANN001, ANN201 - InferenceSession.run's shape
        self.log.append(self.name)
        time.sleep(self.ms / 1e3)
        return [np.zeros(1)]


def _recorders(names: str, log: list[str]) -> list:
    return [runner(_Recorder(name, log, 0.0), {"x": np.zeros(1)}) for name in names]


def test_time_runs_warms_up_then_rotates_blocks_round_by_round():
    log: list[str] = []
    timings = time_runs(_recorders("abc", log), Schedule(runs=4, rounds=3, warmup=1, settle=1))
    assert log[:3] == ["a", "b", "c"]  # warm-up, one callable after the other
    # Blocks of 2, 1, 1 timed runs, each after 1 untimed; the first callable moves along.
    assert "".join(log[3:]) == "aaa" "bbb" "ccc" + "bb" "cc" "aa" + "cc" "aa" "bb"
    assert [s.runs for s in timings.all_stats()] == [4, 4, 4]
    assert timings.rounds == timings.planned_rounds == 3
    assert [len(turn) for turn in timings.rounds_ms[0]] == [2, 1, 1]
    one_by_one: list[str] = []
    time_runs(_recorders("ab", one_by_one), Schedule(runs=2, rounds=1, warmup=0))
    assert one_by_one == ["a", "a", "b", "b"]


def test_time_runs_run_by_run_by_default():
    log: list[str] = []
    timings = time_runs(_recorders("abc", log), Schedule(runs=3, warmup=2))
    assert "".join(log) == "aabbcc" + "abc" "bca" "cab"
    assert [s.runs for s in timings.all_stats()] == [3, 3, 3]
    assert len(timings.paired_ratios(2)) == 3 and (timings.paired_ratios(0) == 1).all()


def test_time_runs_stops_on_time_after_the_least_rounds():
    log: list[str] = []
    done: list[int] = []
    timings = time_runs(_recorders("ab", log),
                        Schedule(runs=10, warmup=0, max_seconds=0.0, min_rounds=3),
                        progress=done.append)
    assert done == [1, 2, 3] and timings.rounds == 3 and timings.planned_rounds == 10
    assert "".join(log) == "ab" "ba" "ab"
    assert timings.seconds >= 0


def test_time_runs_times_each_callable_on_its_own():
    log: list[str] = []
    fast, slow = _Recorder("fast", log, 0.0), _Recorder("slow", log, 5.0)
    fast_stats, slow_stats = time_runs([runner(fast, {}), runner(slow, {})],
                                       Schedule(runs=6, warmup=0)).all_stats()
    assert slow_stats.min_ms >= 5.0 > fast_stats.median_ms
    with pytest.raises(ValueError, match="at least one callable"):
        time_runs([])
    plain = time_runs([lambda: log.append("plain")], Schedule(runs=2, warmup=1))
    assert plain.stats().runs == 2 and log[-3:] == ["plain"] * 3


def test_schedule_checks_its_fields_and_splits_runs_evenly():
    assert Schedule(runs=31, rounds=3).turns == [11, 10, 10]
    assert Schedule(runs=2, rounds=5).turns == [1, 1]
    assert Schedule(runs=3).turns == [1, 1, 1]
    for field, value in (("warmup", -1), ("settle", -1), ("min_rounds", 0), ("rounds", 0),
                         ("max_seconds", -1.0), ("runs", 2.5)):
        with pytest.raises(ValueError, match=f"Schedule.{field} must be"):
            Schedule(**{field: value})


def test_latency_stats_percentiles_and_report_keys():
    stats = LatencyStats.of([float(v) for v in range(100, 0, -1)])
    assert stats.median_ms == 50.5 and stats.mean_ms == 50.5 and stats.runs == 100
    assert stats.p90_ms == pytest.approx(90.1) and stats.p99_ms == pytest.approx(99.01)
    assert stats.iqr_ms == pytest.approx(49.5)
    assert (stats.min_ms, stats.max_ms) == (1.0, 100.0)
    assert stats.throughput(4) == pytest.approx(4e3 / 50.5)
    assert stats.to_dict() == {"median_ms": 50.5, "p90_ms": stats.p90_ms, "mean_ms": 50.5,
                               "min_ms": 1.0, "runs": 100}
    assert LatencyStats.of([2.0]).iqr_ms == 0.0
    with pytest.raises(ValueError, match="at least one timed run"):
        LatencyStats.of([])


def test_time_runs_refuses_spinning_sessions_run_by_run(encoder_path, feeds):
    spinning = [runner(Session(encoder_path, threads=2), feeds) for _ in range(2)]
    assert all(r.spins for r in spinning)
    with pytest.raises(ValueError, match="NO_SPINNING"):
        time_runs(spinning, Schedule(runs=2, warmup=0))
    # Turns of several runs opened by settle runs compare them as an app runs them.
    assert time_runs(spinning, Schedule(runs=4, rounds=2, warmup=0, settle=1)).rounds == 2
    quiet = [runner(Session(encoder_path, threads=2, session_config=NO_SPINNING), feeds),
             runner(Session(encoder_path, threads=1), feeds)]
    assert not any(r.spins for r in quiet)
    stats = time_runs(quiet, Schedule(runs=5, warmup=1)).all_stats()
    assert all(s.runs == 5 and 0 < s.min_ms <= s.median_ms <= s.p90_ms for s in stats)


def test_runner_checks_inputs_first(encoder_path, feeds):
    with pytest.raises(InputError):
        runner(Session(encoder_path), {"input_ids": feeds["input_ids"]})


def test_peak_rss_mb():
    peak = peak_rss_mb()
    assert peak is None or 1 < peak < 1_000_000


# --- text ------------------------------------------------------------------------------------


@pytest.fixture()
def tokenizer_json(tmp_path: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "world": 5, "low": 6}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_text_encoder_pads_to_longest_and_truncates(tokenizer_json):
    encoder = TextEncoder(tokenizer_json, max_length=5)
    batch = encoder.encode(["hello world", "low", "hello world low rank"])
    expected_ids = [[2, 4, 5, 3, 0], [2, 6, 3, 0, 0], [2, 4, 5, 6, 3]]
    assert batch["input_ids"].dtype == np.int64
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1] * 5]
    assert batch["token_type_ids"].tolist() == [[0] * 5] * 3
    short = encoder("low")
    assert short["input_ids"].tolist() == [[2, 6, 3]]


def test_text_encoder_fixed_length_and_input_filter(tokenizer_json, tmp_path):
    encoder = TextEncoder(tokenizer_json, max_length=8, pad_to=6)
    batch = encoder.encode(["hello"], input_names=["input_ids", "attention_mask"])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[2, 4, 3, 0, 0, 0]]
    with pytest.raises(ValueError, match="pad_to"):
        TextEncoder(tokenizer_json, max_length=4, pad_to=6)

    session = Session(build_encoder(tmp_path / "model.onnx"))
    encoded = encoder.encode(["hello world"], input_names=session.input_names)
    np.testing.assert_allclose(
        session.run(encoded)["hidden_states"], reference(**encoded), atol=1e-5
    )


def test_text_encoder_from_bundle(tokenizer_json, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    build_encoder(bundle / "model.onnx")
    shutil.copy(tokenizer_json, bundle / "tokenizer.json")
    tmp_path = bundle
    write_bundle(tmp_path, "model.onnx", ["CPUExecutionProvider"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["files"]["tokenizer"] = "tokenizer.json"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert TextEncoder.from_bundle(tmp_path).encode("hello")["input_ids"].tolist() == [[2, 4, 3]]

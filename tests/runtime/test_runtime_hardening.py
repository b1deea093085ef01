"""The runtime against tampered bundles and hostile or careless inputs (torch-free paths)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from test_runtime import EMBEDDING, OUT, build_encoder  # noqa: E402

from lrt_deploy.errors import BundleError, LrtDeployError  # noqa: E402
from lrt_deploy.runtime import InputError, Session, TextEncoder  # noqa: E402


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bundle(folder: Path, *, checksums: bool = True, text: dict | None = None,
            tokenizer: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    build_encoder(folder / "model.onnx")
    files = {"model": "model.onnx", "onnx": "model.onnx"}
    if tokenizer is not None:
        shutil.copy(tokenizer, folder / "tokenizer.json")
        files["tokenizer"] = "tokenizer.json"
    manifest = {
        "format_version": 1,
        "target": {"name": "cpu", "providers": ["CPUExecutionProvider"]},
        "files": files,
        "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]}
                   for n in ("input_ids", "attention_mask")],
        "outputs": [{"name": "hidden_states", "dtype": "float32",
                     "shape": ["batch", "sequence", OUT]}],
        "text": text,
    }
    if checksums:
        manifest["checksums"] = {name: _sha(folder / name) for name in set(files.values())}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _rewrite_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


IDS = np.array([[1, 2, 3, 4]], dtype=np.int64)


# --- 3. files outside the bundle, checksums ------------------------------------------------------


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_bundle_files_must_stay_inside(tmp_path: Path, escape: str) -> None:
    other = _bundle(tmp_path / "other")
    bundle = _bundle(tmp_path / "bundle")
    if escape == "absolute":
        name = str(other / "model.onnx")
    elif escape == "dotdot":
        name = "../other/model.onnx"
    else:
        (bundle / "link.onnx").symlink_to(other / "model.onnx")
        name = "link.onnx"
    _rewrite_manifest(bundle, files={"model": name})
    with pytest.raises(BundleError, match="outside the bundle"):
        Session(bundle)


def test_flipped_bytes_are_caught_and_verify_false_skips(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")
    Session(bundle)  # intact: opens
    data = bytearray((bundle / "model.onnx").read_bytes())
    start = bytes(data).find(EMBEDDING.tobytes())
    assert start > 0
    # Flip bytes inside a weight's raw data: the graph still loads and runs, silently wrong.
    for index in np.random.default_rng(0).integers(start, start + EMBEDDING.nbytes, size=6):
        data[index] ^= 0x40
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the SHA-256"):
        Session(bundle)
    Session(bundle, verify=False)  # the caller's explicit choice, for start-up time


def test_bundle_without_checksums_opens_with_a_warning(tmp_path: Path, caplog) -> None:
    bundle = _bundle(tmp_path / "bundle", checksums=False)
    # Written before checksums: no 'text' section either (a current one is refused, see
    # test_bundle_integrity.py).
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["text"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        Session(bundle)
    assert "records no checksums" in caplog.text


def test_checksummed_manifest_must_cover_the_model(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")
    _rewrite_manifest(bundle, checksums={"tokenizer.json": "00"})
    with pytest.raises(BundleError, match="no checksum for 'model.onnx'"):
        Session(bundle)


def test_tampered_tokenizer_is_caught(tmp_path: Path, tiny_bert_dir: Path) -> None:
    pytest.importorskip("tokenizers")
    bundle = _bundle(tmp_path / "bundle", tokenizer=tiny_bert_dir / "tokenizer.json")
    TextEncoder.from_bundle(bundle)
    with open(bundle / "tokenizer.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(BundleError, match="tokenizer.json"):
        TextEncoder.from_bundle(bundle)


# --- 8. unreadable manifests ----------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    "{not json", "[1, 2, 3]", '"text"', '{"files": ["model.onnx"]}',
    '{"files": {"model": 3}}', '{"files": {"model": "model.onnx"}, "target": ["cpu"]}',
    '{"files": {"model": "model.onnx"}, "target": {"providers": "CPUExecutionProvider"}}',
    '{"files": {"model": "model.onnx"}, "checksums": [1]}',
    '{"files": {"model": "model.onnx"}, "text": {"vocab_size": "many"}}',
    '{"files": {}}',
])
def test_tampered_manifest_is_one_error_type(tmp_path: Path, content: str) -> None:
    bundle = _bundle(tmp_path / "bundle")
    (bundle / "manifest.json").write_text(content)
    with pytest.raises(BundleError) as info:
        Session(bundle)
    assert isinstance(info.value, LrtDeployError) and "\n" not in str(info.value)


def test_binary_manifest(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")
    (bundle / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BundleError, match="not readable JSON"):
        Session(bundle)


# --- 7. inputs ---------------------------------------------------------------------------------


def test_big_endian_input_is_read_correctly(tmp_path: Path) -> None:
    session = Session(_bundle(tmp_path / "bundle"))
    native = session.run(_feeds(IDS))["hidden_states"]
    swapped = session.run(_feeds(IDS.astype(">i8")))["hidden_states"]
    np.testing.assert_array_equal(native, swapped)
    assert native.shape == (1, 4, OUT)


def test_big_endian_float_is_converted(tmp_path: Path) -> None:
    from lrt_deploy.runtime.session import _cast

    values = np.array([0.5, -1.25, 3.0], dtype=">f4")
    converted = _cast("x", values, "float32")
    assert converted.dtype == np.float32 and converted.dtype.isnative
    np.testing.assert_array_equal(converted, [0.5, -1.25, 3.0])


@pytest.mark.parametrize("bad", [-1, 50])
def test_token_ids_outside_vocabulary(tmp_path: Path, bad: int) -> None:
    session = Session(_bundle(tmp_path / "bundle", text={"vocab_size": 50, "max_sequence": 8}))
    ids = IDS.copy()
    ids[0, 2] = bad
    with pytest.raises(InputError, match=rf"token id {bad}.*\[0, 49\]"):
        session.run(_feeds(ids))


def test_sequence_beyond_the_model(tmp_path: Path) -> None:
    session = Session(_bundle(tmp_path / "bundle", text={"vocab_size": 50, "max_sequence": 8}))
    session.run(_feeds(np.ones((1, 8), dtype=np.int64)))
    with pytest.raises(InputError, match="9 tokens but the model supports at most 8"):
        session.run(_feeds(np.ones((1, 9), dtype=np.int64)))


def test_object_array_input(tmp_path: Path) -> None:
    session = Session(_bundle(tmp_path / "bundle"))
    with pytest.raises(InputError, match="Python objects"):
        session.run({"input_ids": np.array([[1, "a"]], dtype=object),
                     "attention_mask": np.ones((1, 2), dtype=np.int64)})


def test_plain_strings_are_one_element_lists(tmp_path: Path) -> None:
    session = Session(_bundle(tmp_path / "bundle"), providers="CPUExecutionProvider")
    assert session.provider_report()["requested"] == ["CPUExecutionProvider"]
    assert list(session.run(_feeds(IDS), output_names="hidden_states")) == ["hidden_states"]


# --- 6. long texts -----------------------------------------------------------------------------


def test_long_text_is_cut_before_tokenizing(tiny_bert_dir: Path) -> None:
    pytest.importorskip("tokenizers")
    encoder = TextEncoder(tiny_bert_dir / "tokenizer.json", max_length=16)
    words = "the model runs on the phone quickly and quietly".split()
    text = " ".join(words[i % len(words)] for i in range(200_000))  # ~1.1M characters
    prefix = encoder._bounded(text)
    assert len(prefix) < 2_000, "the whole text would be tokenized"
    full = TextEncoder(tiny_bert_dir / "tokenizer.json", max_length=16)
    medium = " ".join(words[i % len(words)] for i in range(3_000))
    expected = full._tokenizer.encode(medium).ids  # full tokenization, then truncation
    assert encoder.encode(medium)["input_ids"][0].tolist() == expected
    assert encoder.encode(text)["input_ids"][0].tolist() == expected


def test_text_without_spaces_is_bounded_too(tiny_bert_dir: Path) -> None:
    pytest.importorskip("tokenizers")
    encoder = TextEncoder(tiny_bert_dir / "tokenizer.json", max_length=16)
    text = "模型在手机上运行" * 250_000  # 2M characters, one token each, no whitespace
    assert len(encoder._bounded(text)) <= 16 * 16
    assert encoder.encode(text)["input_ids"][0].tolist() == encoder.encode(text[:200])[
        "input_ids"][0].tolist()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "external-outside"])
def test_unreadable_model_file_is_a_bundle_error(tmp_path: Path, damage: str) -> None:
    from onnx import TensorProto, helper, numpy_helper

    (tmp_path / "b").mkdir()
    path = build_encoder(tmp_path / "b" / "model.onnx") if damage != "external-outside" else None
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x13" * 500)
    else:
        (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
        weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight],
        )
        path = tmp_path / "b" / "model.onnx"
        path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(BundleError, match="cannot open model 'model.onnx'") as info:
        Session(path)
    assert "\n" not in str(info.value)

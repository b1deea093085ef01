"""Tests for lrt_deploy.load: every model format, on tiny seeded models written to tmp_path."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tiny_models  # noqa: E402
from tiny_models import (  # noqa: E402
    TinyLRTByDesign,
    TrapEncoder,
    make_tiny_encoder,
    make_tiny_mlp,
    save_tiny_bert,
)

from lrt_deploy.errors import (  # noqa: E402
    CorruptModelError,
    ExampleInputsError,
    LrtDeployError,
    ModelNotFoundError,
    UnsupportedFormatError,
    UntrustedPickleError,
)
from lrt_deploy.load import InputSpec, load_model, parse_input_spec, source_hash  # noqa: E402


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text.strip(), f"{type(exc).__name__} has an empty message"
    assert "\n" not in text, f"message is not one line: {text!r}"
    return text


@pytest.fixture(autouse=True)
def _reset_trap():
    tiny_models.TRAP_FIRED.clear()
    yield
    tiny_models.TRAP_FIRED.clear()


@pytest.fixture
def encoder_file(tmp_path: Path) -> Path:
    path = tmp_path / "encoder.pt"
    torch.save(make_tiny_encoder(), path)
    return path


# --- TorchScript -----------------------------------------------------------------------------


@pytest.fixture
def torchscript_file(tmp_path: Path) -> Path:
    model = make_tiny_mlp()
    traced = torch.jit.trace(model, torch.randn(2, 16, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "mlp_traced.pt"
    traced.save(str(path))
    return path


def test_torchscript_loads_with_input_specs(torchscript_file: Path) -> None:
    loaded = load_model(torchscript_file, input_specs=[parse_input_spec("x=2,16")])
    assert loaded.format == "torchscript"
    assert loaded.input_names == ["x"]
    assert loaded.output_names == ["output"]
    assert loaded.example_inputs["x"].shape == (2, 16)
    assert loaded.example_inputs["x"].dtype == torch.float32
    assert loaded.dynamic_axes == {"x": {0: "batch"}}
    assert not loaded.can_compress  # a ScriptModule's layers cannot be swapped
    assert loaded.name == "mlp_traced"
    # Same numbers as the eager model it was traced from.
    x = loaded.example_inputs["x"]
    expected = make_tiny_mlp()(x)
    torch.testing.assert_close(loaded.forward({"x": x})["output"], expected.detach())


def test_torchscript_batch_of_one_is_widened_for_dynamic_export(torchscript_file: Path) -> None:
    loaded = load_model(torchscript_file, input_specs=[parse_input_spec("x=1,16")])
    assert loaded.example_inputs["x"].shape == (2, 16)


def test_torchscript_without_specs_raises_example_inputs_error(torchscript_file: Path) -> None:
    with pytest.raises(ExampleInputsError, match="input_specs") as info:
        load_model(torchscript_file)
    _one_line(info.value)


def test_torchscript_with_wrong_shape_raises_example_inputs_error(torchscript_file: Path) -> None:
    with pytest.raises(ExampleInputsError, match="check input_specs") as info:
        load_model(torchscript_file, input_specs=[parse_input_spec("x=2,7")])
    _one_line(info.value)


# --- torch.save of a full module ---------------------------------------------------------------


def test_pickled_module_refused_without_trust_and_code_not_run(tmp_path: Path) -> None:
    path = tmp_path / "trap.pt"
    torch.save(TrapEncoder(), path)
    with pytest.raises(UntrustedPickleError, match="trust_pickle=True") as info:
        load_model(path)
    _one_line(info.value)
    assert tiny_models.TRAP_FIRED == [], "unpickling ran the file's code without --trust-pickle"


def test_pickled_module_loads_with_trust(tmp_path: Path) -> None:
    path = tmp_path / "trap.pt"
    original = TrapEncoder().eval()
    torch.save(original, path)
    loaded = load_model(path, trust_pickle=True)
    # The trap proves the test above would notice code running.
    assert tiny_models.TRAP_FIRED == ["__setstate__"]
    assert loaded.format == "pickle"
    assert loaded.can_compress
    assert loaded.input_names == ["input_ids"]
    assert loaded.output_names == ["output"]
    assert loaded.dynamic_axes == {"input_ids": {0: "batch"}}
    ids = loaded.example_inputs["input_ids"]
    assert ids.dtype == torch.int64 and ids.shape == (2, 8)
    with torch.no_grad():
        expected = original(ids)
    torch.testing.assert_close(loaded.forward({"input_ids": ids})["output"], expected)
    assert not loaded.module.training


def test_pickled_tiny_encoder_loads_with_trust(encoder_file: Path) -> None:
    loaded = load_model(encoder_file, trust_pickle=True)
    assert isinstance(loaded.module, tiny_models.TinyEncoder)
    assert loaded.name == "encoder"


def test_pickled_lowrank_by_design_module(tmp_path: Path) -> None:
    path = tmp_path / "led.pt"
    torch.manual_seed(0)
    torch.save(TinyLRTByDesign(), path)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.example_inputs["x"].shape == (2, 32)


def test_pickled_module_without_example_inputs_needs_specs(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(make_tiny_mlp(), path)
    with pytest.raises(ExampleInputsError, match="input_specs"):
        load_model(path, trust_pickle=True)
    loaded = load_model(path, trust_pickle=True, input_specs=[parse_input_spec("x=3,16")])
    assert loaded.example_inputs["x"].shape == (3, 16)


# --- state dict + factory ---------------------------------------------------------------------


@pytest.fixture
def state_dict_file(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(make_tiny_encoder().state_dict(), path)
    return path


def test_state_dict_with_factory_reproduces_original(state_dict_file: Path) -> None:
    original = make_tiny_encoder()
    # Perturb the global RNG so equality proves the weights came from the file, not the seed.
    torch.manual_seed(1234)
    loaded = load_model(state_dict_file, factory="tiny_models:make_tiny_encoder")
    assert loaded.format == "state-dict"
    ids = loaded.example_inputs["input_ids"]
    with torch.no_grad():
        expected = original(ids)
    torch.testing.assert_close(loaded.forward({"input_ids": ids})["output"], expected,
                               rtol=0, atol=0)


def test_state_dict_without_factory_is_unsupported(state_dict_file: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match="factory=") as info:
        load_model(state_dict_file)
    _one_line(info.value)


def test_state_dict_with_wrong_factory_is_corrupt(state_dict_file: Path) -> None:
    with pytest.raises(CorruptModelError, match="tiny_models:make_tiny_mlp") as info:
        load_model(state_dict_file, factory="tiny_models:make_tiny_mlp")
    _one_line(info.value)


@pytest.mark.parametrize(
    "factory", ["tiny_models:no_such_function", "no_such_module_xyz:build", "no-colon"]
)
def test_state_dict_with_unusable_factory(state_dict_file: Path, factory: str) -> None:
    with pytest.raises(UnsupportedFormatError, match="factory=") as info:
        load_model(state_dict_file, factory=factory)
    _one_line(info.value)


def test_saved_non_model_object_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "numbers.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(UnsupportedFormatError, match="list"):
        load_model(path)


# --- torch.export ------------------------------------------------------------------------------


def test_torch_export_archive(tmp_path: Path) -> None:
    model = make_tiny_mlp()
    example = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    program = torch.export.export(model, (example,))
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, str(path))

    loaded = load_model(path)
    assert loaded.format == "torch-export"
    assert loaded.input_names == ["x"]
    torch.testing.assert_close(loaded.example_inputs["x"], example)
    assert loaded.output_names == ["output"]
    assert not loaded.can_compress
    with torch.no_grad():
        expected = model(example)
    torch.testing.assert_close(loaded.forward({"x": example})["output"], expected)


# --- Hugging Face folders ----------------------------------------------------------------------


def test_sentence_transformers_folder(tiny_bert_dir: Path) -> None:
    loaded = load_model(tiny_bert_dir)
    assert loaded.format == "sentence-transformers"
    assert loaded.kind == "text-embedding"
    assert loaded.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert loaded.output_names == ["sentence_embedding"]
    assert loaded.tokenizer_file == tiny_bert_dir / "tokenizer.json"
    assert loaded.is_text and loaded.can_compress
    assert loaded.dynamic_axes == {
        name: {0: "batch", 1: "sequence"} for name in loaded.input_names
    }
    assert loaded.max_length == 64  # capped by max_position_embeddings
    out = loaded.forward(loaded.example_inputs)["sentence_embedding"]
    assert out.shape == (2, 32)
    # The folder's modules.json asks for normalisation.
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    batch = loaded.tokenize(["the cat sat"], pad_to=16)
    assert set(batch) == set(loaded.input_names)
    assert batch["input_ids"].shape == (1, 16)


def test_huggingface_folder_without_modules_json(tmp_path: Path, tiny_bert_dir: Path) -> None:
    folder = tmp_path / "plain-bert"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "modules.json").unlink()
    loaded = load_model(folder)
    assert loaded.format == "huggingface"
    assert loaded.kind == "text-hidden"
    assert loaded.output_names == ["last_hidden_state"]
    ids = loaded.example_inputs["input_ids"]
    out = loaded.forward(loaded.example_inputs)["last_hidden_state"]
    assert out.shape == (*ids.shape, 32)


def test_folder_without_config_is_unsupported(tmp_path: Path) -> None:
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    (folder / "README.md").write_text("not a model\n")
    with pytest.raises(UnsupportedFormatError, match="config.json") as info:
        load_model(folder)
    _one_line(info.value)


def test_float16_folder_computes_in_float32(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from transformers import BertModel

    folder = tmp_path / "bert-fp16"
    shutil.copytree(tiny_bert_dir, folder)
    stored = BertModel.from_pretrained(folder).half()
    stored.save_pretrained(folder)
    loaded = load_model(folder)
    params = dict(loaded.module.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    # Upcasting is exact: the stored float16 values, nothing rounded again.
    weight = next(v for k, v in params.items() if k.endswith("attention.self.query.weight"))
    expected = stored.encoder.layer[0].attention.self.query.weight
    assert torch.equal(weight, expected.float())


def test_folder_without_tokenizer_raises(tmp_path: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    save_tiny_bert(folder, sentence_transformers=False)
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ExampleInputsError, match="tokenizer") as info:
        load_model(folder)
    _one_line(info.value)


def test_folder_with_broken_config_is_corrupt(tmp_path: Path, tiny_bert_dir: Path) -> None:
    folder = tmp_path / "broken-bert"
    shutil.copytree(tiny_bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LrtDeployError) as info:
        load_model(folder)
    _one_line(info.value)


# --- unreadable inputs -------------------------------------------------------------------------


def test_missing_path_raises_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        load_model(tmp_path / "nope.pt")
    _one_line(info.value)


def test_text_file_named_pt_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_text("these are not the weights you are looking for\n")
    with pytest.raises(UnsupportedFormatError, match="model.pt") as info:
        load_model(path)
    _one_line(info.value)


def test_truncated_archive_is_a_one_line_error(encoder_file: Path, tmp_path: Path) -> None:
    data = encoder_file.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises((CorruptModelError, UnsupportedFormatError)) as info:
        load_model(path, trust_pickle=True)
    assert isinstance(info.value, LrtDeployError)
    assert "truncated.pt" in _one_line(info.value)


def _rewrite_archive(source: Path, target: Path, *, drop: str = "", replace: str = "",
                     data: bytes = b"") -> Path:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for name in zin.namelist():
            content = zin.read(name)
            if drop and drop in name:
                continue
            if replace and name.endswith(replace):
                content = data
            zout.writestr(name, content)
    return target


def test_archive_missing_tensor_data_is_corrupt(state_dict_file: Path, tmp_path: Path) -> None:
    path = _rewrite_archive(state_dict_file, tmp_path / "no-data.pt", drop="/data/")
    with pytest.raises(CorruptModelError, match="no-data.pt") as info:
        load_model(path, factory="tiny_models:make_tiny_encoder")
    _one_line(info.value)


def test_damaged_pickle_in_archive_is_corrupt_not_untrusted(
    state_dict_file: Path, tmp_path: Path
) -> None:
    path = _rewrite_archive(
        state_dict_file, tmp_path / "damaged.pt", replace="data.pkl", data=b"\x80\x02garbage"
    )
    with pytest.raises(CorruptModelError):
        load_model(path, factory="tiny_models:make_tiny_encoder")


# --- input specs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x=2,16", InputSpec("x", (2, 16), "float32")),
        ("input_ids=1,128:int64", InputSpec("input_ids", (1, 128), "int64")),
        ("mask=4:bool", InputSpec("mask", (4,), "bool")),
        ("pixels=1,3,8,8:float16", InputSpec("pixels", (1, 3, 8, 8), "float16")),
    ],
)
def test_parse_input_spec_good(text: str, expected: InputSpec) -> None:
    assert parse_input_spec(text) == expected


@pytest.mark.parametrize(
    "text", ["x", "x=", "x=a,b", "=2,16", "x=0,16", "x=2,-1", "x=2,,16", "x=2.5"]
)
def test_parse_input_spec_bad(text: str) -> None:
    with pytest.raises(ExampleInputsError) as info:
        parse_input_spec(text)
    assert isinstance(info.value, LrtDeployError)
    _one_line(info.value)


def test_unknown_dtype_in_spec_raises(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(make_tiny_mlp(), path)
    with pytest.raises(ExampleInputsError, match="dtype 'float99' of input 'x' is not supported"):
        load_model(path, trust_pickle=True, input_specs=[parse_input_spec("x=2,16:float99")])


def test_int_spec_gives_integer_tensor(tmp_path: Path) -> None:
    path = tmp_path / "enc.pt"
    torch.save(make_tiny_encoder(), path)
    loaded = load_model(path, trust_pickle=True,
                        input_specs=[parse_input_spec("input_ids=3,5:int64")])
    ids = loaded.example_inputs["input_ids"]
    assert ids.dtype == torch.int64 and ids.shape == (3, 5)
    assert loaded.forward({"input_ids": ids})["output"].shape == (3, 5, 8)


# --- source hash -------------------------------------------------------------------------------


def test_source_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    payload = bytes(range(256)) * 64
    path.write_bytes(payload)
    first = source_hash(path)
    assert first == source_hash(path)
    assert len(first) == 64 and all(c in "0123456789abcdef" for c in first)
    changed = bytearray(payload)
    changed[1000] ^= 0x01
    path.write_bytes(bytes(changed))
    assert source_hash(path) != first
    path.write_bytes(payload)
    assert source_hash(path) == first


def test_source_hash_of_folder_covers_names_and_contents(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("beta")
    first = source_hash(folder)
    assert first == source_hash(folder)
    (folder / "sub" / "b.txt").write_text("betb")
    assert source_hash(folder) != first
    (folder / "sub" / "b.txt").write_text("beta")
    assert source_hash(folder) == first
    (folder / "a.txt").rename(folder / "c.txt")
    assert source_hash(folder) != first


def test_loaded_model_records_its_source_hash(encoder_file: Path) -> None:
    loaded = load_model(encoder_file, trust_pickle=True)
    assert loaded.source_hash == source_hash(encoder_file)
    assert loaded.source_path == encoder_file

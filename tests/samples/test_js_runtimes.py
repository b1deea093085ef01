"""The bundle outside Python: Node (onnxruntime-node), a browser page (onnxruntime-web in
headless Chromium) and the Android app's contract, against the Python runtime.

Needs ``node`` with ``npm ci`` run in samples/js, and Debian's ``chromium`` for the page;
``scripts/setup_tests.sh`` installs both. The tests skip only when node or chromium is absent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
JS_DIR = SAMPLES / "js"
CONTRACT_PATH = SAMPLES / "bundle-contract.json"
KOTLIN_CONTRACT = (
    SAMPLES / "android/app/src/main/java/ai/lrtdeploy/sample/BundleContract.kt"
)
NODE = shutil.which("node")
NPM = shutil.which("npm")


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, JS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # compare_layers imports compare by this name
    spec.loader.exec_module(module)
    return module


compare = _load("compare")
compare_layers = _load("compare_layers")
needs_node = pytest.mark.skipif(
    NODE is None, reason="node is not installed (scripts/setup_tests.sh)"
)
needs_chromium = pytest.mark.skipif(
    not Path(compare.CHROMIUM).is_file(),
    reason=f"{compare.CHROMIUM} is missing (scripts/setup_tests.sh installs Debian's chromium)",
)


@pytest.fixture(scope="session")
def node_modules() -> Path:
    folder = JS_DIR / "node_modules"
    if NODE is not None and not (folder / "onnxruntime-node").is_dir():
        pytest.fail("samples/js/node_modules is missing: run scripts/setup_tests.sh (npm ci)")
    return folder


def _export(args: list[str], out: Path) -> Path:
    from lrt_deploy.cli.export import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([*args, "-q", "-o", str(out)])
    assert code == 0, stderr.getvalue()
    return out


@pytest.fixture(scope="session")
def quickstart_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick start's mobile bundle (dynamic int8, fused attention), exported once."""
    return _export(
        ["all-MiniLM-L6-v2", "--target", "mobile", "--budget", "0.9",
         "--factorize-embeddings", "--quantize", "int8"],
        tmp_path_factory.mktemp("quickstart") / "bundle",
    )


@pytest.fixture(scope="session")
def python_result(quickstart_bundle: Path) -> dict[str, Any]:
    return compare.python_embeddings(quickstart_bundle, compare.SENTENCES, runs=3, warmup=1)


@pytest.fixture(scope="session")
def weight_only_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick start's bundle with int8 weights but float activations (web-reproducible)."""
    return _export(
        ["all-MiniLM-L6-v2", "--target", "mobile", "--budget", "0.9",
         "--factorize-embeddings", "--quantize", "int8", "--quant-format", "weight-only"],
        tmp_path_factory.mktemp("weight-only") / "bundle",
    )


def _node_eval(script: str) -> Any:
    assert NODE is not None
    proc = subprocess.run(
        [NODE, "--input-type=module", "-e", script],
        cwd=JS_DIR, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@needs_node
@pytest.mark.skipif(NPM is None, reason="npm is not installed (scripts/setup_tests.sh)")
def test_npm_test_passes(node_modules: Path) -> None:
    """samples/js's own suite (node --test) passes against its committed fixture bundle."""
    assert NPM is not None
    proc = subprocess.run(
        [NPM, "test", "--silent"], cwd=JS_DIR, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"^# fail 0$", proc.stdout, re.MULTILINE), proc.stdout[-2000:]


# --- the contract: one JSON, the JS module and the Kotlin app agree --------------------------


def _kotlin_contract() -> dict[str, Any]:
    source = KOTLIN_CONTRACT.read_text(encoding="utf-8")
    constants = {
        name: json.loads(value)
        for name, value in re.findall(r"const val (\w+) = (\"[^\"]*\"|\d+)", source)
    }
    outputs = [
        {"name": name, "rank": int(rank), "pooling": pooling.lower(),
         "normalize": normalize == "true"}
        for name, rank, pooling, normalize in re.findall(
            r'OutputRule\(name = "(\w+)", rank = (\d+), pooling = Pooling\.(\w+), '
            r"normalize = (true|false)\)",
            source,
        )
    ]
    pads = re.search(r"PAD_TOKEN_CANDIDATES = listOf\(([^)]*)\)", source)
    assert pads is not None, "BundleContract.kt lost PAD_TOKEN_CANDIDATES"
    return {**constants, "outputs": outputs, "pads": json.loads(f"[{pads.group(1)}]")}


def test_kotlin_contract_matches_contract_json() -> None:
    contract = json.loads(CONTRACT_PATH.read_text(encoding="utf-8"))
    kotlin = _kotlin_contract()
    assert kotlin["CONTRACT_VERSION"] == contract["contract_version"]
    assert kotlin["MANIFEST_FILE"] == contract["manifest"]["file"]
    assert kotlin["FORMAT_VERSION"] == contract["manifest"]["format_version"]
    assert {kotlin["INPUT_IDS"], kotlin["ATTENTION_MASK"], kotlin["TOKEN_TYPE_IDS"]} == set(
        contract["inputs"]
    )
    for rule in contract["inputs"].values():
        assert (kotlin["INPUT_DTYPE"], kotlin["INPUT_RANK"]) == (rule["dtype"], rule["rank"])
    assert kotlin["MAX_LENGTH"] == contract["tokenizer"]["max_length"]
    assert kotlin["pads"] == contract["tokenizer"]["pad_token_candidates"]
    assert kotlin["outputs"] == contract["outputs"]


@needs_node
def test_js_contract_matches_contract_json(node_modules: Path) -> None:
    contract = json.loads(CONTRACT_PATH.read_text(encoding="utf-8"))
    js = _node_eval(
        'import { CONTRACT } from "./src/bundle.js"; console.log(JSON.stringify(CONTRACT));'
    )
    assert js["contractVersion"] == contract["contract_version"]
    assert js["manifestFile"] == contract["manifest"]["file"]
    assert js["formatVersion"] == contract["manifest"]["format_version"]
    assert js["inputs"] == contract["inputs"]
    assert js["outputs"] == contract["outputs"]
    assert js["maxLength"] == contract["tokenizer"]["max_length"]
    assert js["padTokenCandidates"] == contract["tokenizer"]["pad_token_candidates"]


def _lookup(manifest: dict[str, Any], dotted: str) -> Any:
    value: Any = manifest
    for key in dotted.split("."):
        value = value[key]
    return value


def test_fresh_bundle_follows_the_contract(quickstart_bundle: Path) -> None:
    contract = json.loads(CONTRACT_PATH.read_text(encoding="utf-8"))
    fields = contract["manifest"]
    manifest = json.loads((quickstart_bundle / fields["file"]).read_text(encoding="utf-8"))
    assert manifest["format_version"] == fields["format_version"]
    for key in ("model_file", "onnx_file", "tokenizer_file"):
        assert (quickstart_bundle / _lookup(manifest, fields[key])).is_file(), key
    for key in ("inputs", "outputs"):
        for spec in manifest[fields[key]]:
            assert sorted(spec) == sorted(fields["tensor_fields"])
    inputs = {spec["name"]: spec for spec in manifest["inputs"]}
    assert set(inputs) <= set(contract["inputs"])
    for name, rule in contract["inputs"].items():
        if rule["required"]:
            assert name in inputs
        if name in inputs:
            assert inputs[name]["dtype"] == rule["dtype"]
            assert len(inputs[name]["shape"]) == rule["rank"]
    # The quick start's graph pools and normalises itself: the app must not pool again.
    outputs = {spec["name"]: spec for spec in manifest["outputs"]}
    chosen = next(rule for rule in contract["outputs"] if rule["name"] in outputs)
    assert chosen == {"name": "sentence_embedding", "rank": 2, "pooling": "none",
                      "normalize": False}
    assert outputs["sentence_embedding"]["dtype"] == "float32"
    assert len(outputs["sentence_embedding"]["shape"]) == chosen["rank"]


@needs_node
def test_js_refuses_a_newer_bundle_format(node_modules: Path) -> None:
    result = _node_eval(
        'import { checkManifest } from "./src/bundle.js";'
        "try { checkManifest({ format_version: 2 }); console.log('null'); }"
        "catch (e) { console.log(JSON.stringify({ name: e.name, message: e.message })); }"
    )
    assert result["name"] == "BundleError"
    assert "format_version 2" in result["message"]


# --- Node and the page against the Python runtime ------------------------------------------


@needs_node
def test_js_tokenizer_gives_python_token_ids(quickstart_bundle: Path, node_modules: Path) -> None:
    from lrt_deploy.runtime import TextEncoder

    expected = TextEncoder.from_bundle(quickstart_bundle).encode(compare.SENTENCES)
    bundle = json.dumps(str(quickstart_bundle))
    got = _node_eval(
        'import { readFile } from "node:fs/promises"; import path from "node:path";'
        'import { loadTokenizer, encode } from "./src/bundle.js";'
        f"const dir = {bundle};"
        "const load = (name) => readFile(path.join(dir, name), 'utf8');"
        "const tok = await loadTokenizer(load, 'tokenizer.json');"
        f"const e = encode(tok, {json.dumps(compare.SENTENCES)});"
        "console.log(JSON.stringify({ dims: [e.batch, e.length],"
        " ids: Array.from(e.inputIds, Number), mask: Array.from(e.attentionMask, Number) }));"
    )
    assert tuple(got["dims"]) == expected["input_ids"].shape
    # The long sentence is truncated to 128 tokens with [SEP] kept, as in Python.
    assert got["dims"][1] == 128
    np.testing.assert_array_equal(np.reshape(got["ids"], got["dims"]), expected["input_ids"])
    np.testing.assert_array_equal(
        np.reshape(got["mask"], got["dims"]), expected["attention_mask"]
    )


@needs_node
def test_node_embeds_like_python(
    quickstart_bundle: Path, python_result: dict[str, Any], node_modules: Path
) -> None:
    result = compare.node_embeddings(quickstart_bundle, compare.SENTENCES, runs=3)
    assert result["output"] == "sentence_embedding"
    assert result["modelFile"] == "model.ort"
    cosines = compare.cosines(python_result["embeddings"], result["embeddings"])
    assert cosines.min() >= 0.9999, cosines
    assert result["memory"]["peakRssBytes"] > 0
    assert result["latency"]["medianMs"] > 0
    # What just ran in Node must be what the manifest claims runs there (no unverified ops).
    runtimes = json.loads((quickstart_bundle / "manifest.json").read_text())["runtimes"]
    assert runtimes["onnxruntime-node"]["runs"] is True, runtimes["onnxruntime-node"]
    assert runtimes["onnxruntime-web-wasm"]["unverified"] == [], runtimes


# The page on the quick start's dynamic int8 bundle: cosine 0.9977 to 0.9997 to Python,
# sentence by sentence (Node: 1.000000). Not a WebAssembly bug: every kernel agrees to float
# rounding (the first difference is LayerNormalization's last bit, 3e-7), but dynamic int8
# rounds each activation to int8 at run time, so a last-bit difference that lands on a
# rounding boundary becomes a whole int8 step (~1e-3 of a token), which moves further values
# across boundaries in the next layers, and the tensor extremes with them (then the scale
# and zero point, and every value of the tensor). The same 3e-7 change made in native ORT
# alone moves the embeddings as far (test_dynamic_int8_amplifies_last_bit_differences). Two
# builds whose float kernels differ (x86 against WebAssembly, or ARM) can only agree to
# 0.9999 on a graph that rounds no activation: --quant-format weight-only (tests below).
DYNAMIC_INT8_PAGE_FLOOR = 0.995
PAGE_FLOOR = 0.9999


@needs_node
@needs_chromium
def test_page_embeds_like_python(
    quickstart_bundle: Path, python_result: dict[str, Any], node_modules: Path
) -> None:
    with compare.serve_bundle(quickstart_bundle) as url:
        result = compare.page_embeddings(url, compare.SENTENCES, runs=3)
    assert "error" not in result, result
    assert result["runtime"] == "onnxruntime-web"
    assert result["crossOriginIsolated"] is True
    assert result["modelFile"] == "model.ort"
    assert result["memory"]["bytes"] > 0
    cosines = compare.cosines(python_result["embeddings"], result["embeddings"])
    assert cosines.min() >= DYNAMIC_INT8_PAGE_FLOOR, cosines


@needs_node
@needs_chromium
def test_page_matches_python_without_dynamic_int8(
    tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory, node_modules: Path
) -> None:
    """4-bit weights keep activations in float: the page then agrees with Python to 0.9999.

    On MiniLM this is the contrast that matters (int4 and int8 weight-only: 1.000000 against
    dynamic int8's 0.9977; samples/js/README.md); on this tiny random model dynamic int8
    happens to agree too, so this test checks that the int4 path (MatMulNBits in WebAssembly)
    runs and agrees.
    """
    bundle = _export(
        [str(tiny_bert_dir), "--target", "mobile", "--rank", "0.5", "--quantize", "int4",
         "--runs", "3"],
        tmp_path_factory.mktemp("int4") / "bundle",
    )
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    assert "DynamicQuantizeLinear" not in manifest["quantization"].get("quantized_ops", {})
    # The tiny model has 64 positions: short sentences only.
    sentences = [text for text in compare.SENTENCES if len(text) < 80]
    python = compare.python_embeddings(bundle, sentences, runs=1, warmup=0)
    with compare.serve_bundle(bundle) as url:
        result = compare.page_embeddings(url, sentences, runs=1)
    assert "error" not in result, result
    cosines = compare.cosines(python["embeddings"], result["embeddings"])
    assert cosines.min() >= PAGE_FLOOR, cosines
    # int4 bundles hold MultiHeadAttention and GatherBlockQuantized (uint8 pairs): Node too
    node = compare.node_embeddings(bundle, sentences, runs=1)
    assert compare.cosines(python["embeddings"], node["embeddings"]).min() >= PAGE_FLOOR
    runtimes = manifest["runtimes"]
    assert {"com.microsoft:GatherBlockQuantized", "com.microsoft:MultiHeadAttention"} <= {
        f"{domain}:{op}" for domain, op in _graph_ops(bundle / "model.onnx")}
    assert runtimes["onnxruntime-web-wasm"]["unverified"] == [], runtimes
    assert runtimes["onnxruntime-node"]["unverified"] == [], runtimes


def _graph_ops(path: Path) -> set[tuple[str, str]]:
    import onnx

    return {(node.domain or "ai.onnx", node.op_type) for node in onnx.load(str(path)).graph.node}


def _perturbed_first_layernorm(bundle: Path, seeds: range) -> list[float]:
    """Worst cosine of the embeddings after scaling the first LayerNorm's gamma by 1 + 3e-7
    noise (the size of the x86/WebAssembly float difference), native ORT only."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from lrt_deploy.runtime import TextEncoder

    base = onnx.load(str(bundle / "model.onnx"))
    names = {value.name for value in base.graph.input}
    feeds = {key: value for key, value in TextEncoder.from_bundle(bundle)
             .encode(compare.SENTENCES).items() if key in names}
    gamma = next(n for n in base.graph.node if n.op_type == "LayerNormalization").input[1]

    def embed(model: Any) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(["sentence_embedding"], feeds)[0]

    reference = embed(base)
    worst = []
    for seed in seeds:
        model = onnx.ModelProto()
        model.CopyFrom(base)
        init = next(i for i in model.graph.initializer if i.name == gamma)
        values = numpy_helper.to_array(init)
        noise = np.random.default_rng(seed).standard_normal(values.shape)
        init.CopyFrom(numpy_helper.from_array((values * (1 + 3e-7 * noise)).astype(np.float32),
                                              gamma))
        worst.append(float(compare.cosines(reference, embed(model)).min()))
    return worst


def test_dynamic_int8_amplifies_last_bit_differences(
    quickstart_bundle: Path, weight_only_bundle: Path
) -> None:
    """The cause of the page's 0.998, shown without any browser: a 3e-7 relative change of
    one LayerNorm moves dynamic int8 embeddings by up to ~0.006 cosine; with float
    activations (weight-only int8) it stays float noise."""
    dynamic = _perturbed_first_layernorm(quickstart_bundle, range(3))
    assert min(dynamic) < PAGE_FLOOR, dynamic
    weight_only = _perturbed_first_layernorm(weight_only_bundle, range(3))
    assert min(weight_only) > 0.99999, weight_only


@needs_node
@needs_chromium
def test_weight_only_int8_embeds_like_python_in_node_and_page(
    quickstart_bundle: Path, weight_only_bundle: Path, node_modules: Path
) -> None:
    """The quick start's recipe with --quant-format weight-only: Node and the page give
    Python's embeddings to 0.9999, at dynamic int8's size."""
    manifest = json.loads((weight_only_bundle / "manifest.json").read_text(encoding="utf-8"))
    jsonschema = pytest.importorskip("jsonschema")
    from lrt_deploy.schemas import load_schema

    jsonschema.Draft202012Validator(load_schema("manifest")).validate(manifest)
    assert manifest["target"]["precision"] == {"kind": "int8-weight-only"}, manifest["target"]
    quantized = manifest["quantization"]["quantized_ops"]
    assert "DynamicQuantizeLinear" not in quantized and quantized["MatMulNBits"] > 0, quantized
    assert "note" not in manifest["runtimes"]["onnxruntime-web-wasm"], manifest["runtimes"]
    size = (weight_only_bundle / "model.ort").stat().st_size
    assert size < 1.05 * (quickstart_bundle / "model.ort").stat().st_size
    python = compare.python_embeddings(weight_only_bundle, compare.SENTENCES, runs=1, warmup=0)
    node = compare.node_embeddings(weight_only_bundle, compare.SENTENCES, runs=1)
    assert compare.cosines(python["embeddings"], node["embeddings"]).min() >= PAGE_FLOOR
    with compare.serve_bundle(weight_only_bundle) as url:
        page = compare.page_embeddings(url, compare.SENTENCES, runs=1)
    assert "error" not in page, page
    assert page["modelFile"] == "model.ort"
    cosines = compare.cosines(python["embeddings"], page["embeddings"])
    assert cosines.min() >= PAGE_FLOOR, cosines


@needs_node
def test_wasm_parts_from_native_by_float_rounding_only(
    quickstart_bundle: Path, node_modules: Path, tmp_path: Path
) -> None:
    """Tensor by tensor (compare_layers.py): the first difference between the wasm backend
    and native ORT is float rounding, every integer GEMM is exact in wasm, and the int8
    values only start to differ after the first layers: rounding, not a wrong kernel."""
    model, native, web = compare_layers.run_both(quickstart_bundle, tmp_path, "web")
    first = next(
        (name for node in model.graph.node for name in node.output
         if name in web and native[name].dtype.kind == "f"
         and not np.array_equal(native[name], web[name])),
        None,
    )
    assert first is not None
    relative = np.abs(native[first] - web[first]).max() / np.abs(native[first]).max()
    assert relative < 1e-5, (first, relative)
    flips = []
    for node in model.graph.node:
        if node.op_type == "MatMulInteger":
            a, b, *zero = (web[n] if n in web else _constant(model, n) for n in node.input)
            za = zero[0].astype(np.int64) if zero else 0
            zb = zero[1].astype(np.int64) if len(zero) > 1 else 0
            exact = np.matmul(a.astype(np.int64) - za, b.astype(np.int64) - zb)
            np.testing.assert_array_equal(web[node.output[0]], exact)
        if node.op_type == "DynamicQuantizeLinear":
            flips.append(int((native[node.output[0]] != web[node.output[0]]).sum()))
    assert flips[0] == 0 and flips[-1] > 0, flips


def _constant(model: Any, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


# --- wasm-bench.js: the WebAssembly side of benchmarks/bench_backends.py ----------------------


def _embedding_graph(path: Path, table: np.ndarray, projections: list[np.ndarray]) -> Path:
    """input_ids -> Gather(table) -> MatMul chain: a dense layer, or a low-rank pair."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(table, "table")]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h0"])]
    for i, weight in enumerate(projections):
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]))
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@needs_node
def test_wasm_bench_outputs_match_native_and_times_pairs(
    node_modules: Path, tmp_path: Path
) -> None:
    """wasm-bench.js writes each graph's output per batch (float graphs: native ORT's numbers
    up to float rounding) and times the graphs interleaved, ratios against the first one."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 64)).astype(np.float32)
    dense = _embedding_graph(tmp_path / "dense.onnx", table,
                             [rng.standard_normal((64, 64)).astype(np.float32)])
    pair = _embedding_graph(tmp_path / "pair.onnx", table,
                            [rng.standard_normal((64, 8)).astype(np.float32),
                             rng.standard_normal((8, 64)).astype(np.float32)])
    batches = [rng.integers(0, 50, (2, 5)), rng.integers(0, 50, (3, 7))]

    def feeds(ids: np.ndarray) -> dict[str, Any]:
        return {"input_ids": {"dims": list(ids.shape), "data": ids.reshape(-1).tolist()}}

    (tmp_path / "batches.json").write_text(json.dumps([feeds(b) for b in batches]))
    (tmp_path / "feeds.json").write_text(json.dumps(feeds(batches[0])))
    assert NODE is not None
    proc = subprocess.run(
        [NODE, "wasm-bench.js", "--models", f"{dense},{pair}", "--feeds",
         str(tmp_path / "feeds.json"), "--runs", "6", "--blocks", "3",
         "--outputs", str(tmp_path / "batches.json"), "--out", str(tmp_path / "out")],
        cwd=JS_DIR, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    timings = json.loads(proc.stdout)
    assert set(timings) == {str(dense), str(pair)}
    assert timings[str(dense)]["ratio"] == 1.0  # the baseline against itself, run by run
    low, ratio, high = (timings[str(pair)][k] for k in ("ratio_low", "ratio", "ratio_high"))
    assert 0 < low <= high and ratio > 0 and timings[str(pair)]["median_ms"] > 0
    for g, path in enumerate((dense, pair)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for b, ids in enumerate(batches):
            expected = session.run(None, {"input_ids": ids})[0]
            raw = (tmp_path / "out" / f"{g}-{b}.bin").read_bytes()
            got = np.frombuffer(raw, dtype=np.float32).reshape(expected.shape)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@needs_node
def test_wasm_bench_takes_float_feeds(node_modules: Path, tmp_path: Path) -> None:
    """Typed float32 feeds (bench_backends.py's one-matrix probes) reach the graph as floats."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = rng.standard_normal((2, 16)).astype(np.float32)
    feeds = {"x": {"dims": [2, 16], "data": x.reshape(-1).tolist(), "type": "float32"}}
    (tmp_path / "batches.json").write_text(json.dumps([feeds]))
    assert NODE is not None
    proc = subprocess.run(  # --runs 0: outputs only, no timing, no --feeds
        [NODE, "wasm-bench.js", "--models", str(tmp_path / "m.onnx"), "--runs", "0",
         "--outputs", str(tmp_path / "batches.json"), "--out", str(tmp_path / "out")],
        cwd=JS_DIR, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {}
    expected = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    got = np.frombuffer((tmp_path / "out" / "0-0.bin").read_bytes(), dtype=np.float32)
    np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


# --- benchmarks/bench_bundles.py: which file of a bundle it measures, and what it reports ------


def _bench_bundles() -> Any:
    path = SAMPLES.parent / "benchmarks" / "bench_bundles.py"
    spec = importlib.util.spec_from_file_location("bench_bundles", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_bundles_measures_the_file_the_manifest_ships(
    quickstart_bundle: Path, tmp_path: Path
) -> None:
    bench = _bench_bundles()
    name, model = bench._resolve(f"quick start={quickstart_bundle}")
    assert (name, model) == ("quick start", quickstart_bundle / "model.ort")
    assert bench._resolve(f"bare={model}") == ("bare", model)
    made = bench._from_manifest(model)
    assert made["target"] == "mobile" and made["budget"] == 0.9
    assert made["healing"] is None  # the quick start does not heal
    assert bench._from_manifest(tmp_path / "model.onnx") == {}  # no manifest beside it
    with pytest.raises(SystemExit, match="no model.ort or model.onnx there"):
        bench._resolve(f"empty={tmp_path}")
    with pytest.raises(SystemExit, match="NAME=PATH"):
        bench._resolve(str(quickstart_bundle))

"""Prove lrt_deploy.runtime (lrt-bench and the manifest check included) works in a process where
torch, onnx and transformers cannot load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter. The finder refuses the top-level packages torch, onnx and
# transformers and all their submodules; "onnxruntime" has a different top-level name, so it
# is not caught by the "onnx" entry.
CHILD = textwrap.dedent(
    """
    import importlib.abc
    import json
    import sys

    BLOCKED = {"torch", "onnx", "transformers"}
    attempts = []

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in BLOCKED:
                attempts.append(fullname)
                raise ImportError(f"{fullname} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in ("torch", "torch.nn", "onnx", "onnx.helper", "transformers"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"blocker failed to block {name}")
    attempts.clear()

    import contextlib
    import io

    import numpy as np
    from lrt_deploy.runtime import Schedule, Session, runner, time_runs
    from lrt_deploy.cli.bench import main as bench_main
    from lrt_deploy.runtime.contract import check_manifest

    session = Session(sys.argv[1], target="cpu", threads=1)
    ids = np.array([[1, 2, 3]], dtype=np.int32)
    outputs = session.run({"input_ids": ids})
    stats = time_runs([runner(session, {"input_ids": ids})], Schedule(runs=3, warmup=1)).stats()
    # lrt-bench and the manifest check run here too (the memory probe is a separate process).
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        bench_code = bench_main([sys.argv[1], "--sequence", "4", "--runs", "2", "--warmup", "1",
                                 "--no-memory", "-q"])
    contract_error = None
    try:
        check_manifest({"format_version": 99}, ".")
    except ValueError as error:
        contract_error = str(error)
    print(json.dumps({
        "output": outputs["y"].tolist(),
        "active": session.active_providers,
        "runs": stats.runs,
        "bench_code": bench_code,
        "bench_table": table.getvalue(),
        "contract_error": contract_error,
        "blocked_attempts": attempts,
        "loaded": sorted(
            name for name in sys.modules
            if name.split(".")[0] in {"torch", "onnx", "transformers", "onnxruntime"}
            and "." not in name
        ),
    }))
    """
)


def test_runtime_imports_and_runs_without_torch_or_onnx(tmp_path: Path):
    # 100 rows: lrt-bench draws token ids from 1..99 for a model without a tokenizer.
    table = np.arange(200, dtype=np.float32).reshape(100, 2)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["y"])],
        "lookup",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 2])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    model_path = tmp_path / "lookup.onnx"
    onnx.save(model, str(model_path))

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["output"] == table[[[1, 2, 3]]].tolist()
    assert result["active"] == ["CPUExecutionProvider"]
    assert result["runs"] == 3
    assert result["bench_code"] == 0
    assert "| lookup" in result["bench_table"]
    assert result["contract_error"].startswith("bundle format 99 is newer than this lrt-deploy")
    assert result["loaded"] == ["onnxruntime"]
    # Nothing on the runtime's import path even tried to reach torch or transformers.
    assert not [name for name in result["blocked_attempts"] if not name.startswith("onnx")]

"""The one workaround for the ORT training wheel: onnxruntime, its training API and its quantizer
load without torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_runtime_loads_inference_training_and_quantization_without_torch():
    out = _run(
        "import sys\n"
        "from wordahead.model import runtime\n"
        "ort = runtime.onnxruntime(); api = runtime.training_api(); q = runtime.quantization_api()\n"
        "assert callable(api.Module) and callable(api.Optimizer) and callable(q.quantize_dynamic)\n"
        "print('TORCH', 'torch' in sys.modules, ort.__version__)\n"
    )
    assert "TORCH False 1.19.2" in out


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch installed")
def test_the_trap_is_real_plain_import_pulls_torch():
    # If a future wheel stops importing torch, this fails and the workaround can go.
    out = _run("import sys, onnxruntime\nprint('TORCH', 'torch' in sys.modules)\n")
    assert "TORCH True" in out

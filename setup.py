"""Builds anchor_kernels._C: the C++ CPU kernel always, the CUDA kernel when torch has CUDA
and nvcc is present. Build knobs (environment):
  ANCHOR_KERNELS_SKIP_CUDA=1        build the CPU extension only
  ANCHOR_KERNELS_CUDA_ARCHS="80;90a"  SM targets (default: 80 and 90a), plus compute_90 PTX that
                                    the driver compiles for newer GPUs (Blackwell and later)
  ANCHOR_KERNELS_DEBUG=1            keep debug info (release builds strip the .so: 7 MB -> < 1 MB)
Metadata lives in pyproject.toml; this file builds the extension, pins torch to the build's
major.minor and records it in anchor_kernels/_build_info.py (checked at import, native.py).
"""
import os
import shutil
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:
    raise SystemExit(
        "anchor_kernels compiles a C++ extension against the torch it will run with, and no torch is "
        f"importable here ({exc}). Install torch first, then build without build isolation:\n"
        "    pip install torch setuptools wheel ninja\n"
        "    pip install --no-build-isolation <this sdist, or . in a checkout>\n"
        "An isolated build would compile against another torch, whose ABI does not match yours.")

ROOT = Path(__file__).parent
DEBUG = os.environ.get("ANCHOR_KERNELS_DEBUG") == "1"
# -g0 last wins over the -g in Python's own CFLAGS; -s strips the linked .so.
CXX_FLAGS = ["-O3", "-fopenmp-simd"] + ([] if DEBUG else ["-g0"])  # the C++ standard is torch's choice
LINK_FLAGS = [] if DEBUG else ["-s"]
TORCH_MAJOR_MINOR = ".".join(torch.__version__.split("+")[0].split(".")[:2])


def want_cuda() -> bool:
    if os.environ.get("ANCHOR_KERNELS_SKIP_CUDA") == "1":
        return False
    if torch.version.cuda is None:
        print("anchor_kernels: torch has no CUDA; building the CPU extension only")
        return False
    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        print("anchor_kernels: nvcc not found; building the CPU extension only")
        return False
    return True


def gencode_flags() -> list[str]:
    archs = os.environ.get("ANCHOR_KERNELS_CUDA_ARCHS", "80;90a").split(";")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    return flags + ["-gencode=arch=compute_90,code=compute_90"]


def extension():
    sources = ["csrc/ops.cpp", "csrc/kernels/steer_cpu.cpp"]
    include_dirs = [str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "kernels")]
    if want_cuda():
        return cpp_extension.CUDAExtension(
            "anchor_kernels._C",
            sources + ["csrc/ops_cuda.cpp", "csrc/kernels/steer_cuda.cu"],
            include_dirs=include_dirs,
            define_macros=[("ANCHOR_KERNELS_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": CXX_FLAGS,
                "nvcc": ["-O3", *gencode_flags()],
            },
            extra_link_args=LINK_FLAGS,
        )
    return cpp_extension.CppExtension(
        "anchor_kernels._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS,
    )


def write_build_info():
    # Generated (not in git, not in the sdist): the wheel carries the torch it was compiled for.
    (ROOT / "anchor_kernels" / "_build_info.py").write_text(
        f'"""Written by setup.py at build time."""\nTORCH_VERSION = {torch.__version__!r}\n'
        f"CUDA_VERSION = {torch.version.cuda!r}\n")


write_build_info()
major, minor = map(int, TORCH_MAJOR_MINOR.split("."))


setup(
    # The .so is ABI-bound to this torch release: pip must not pair the wheel with another one.
    install_requires=[f"torch>={major}.{minor},<{major}.{minor + 1}", "packaging"],
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

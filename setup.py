"""Builds anchor_kernels._C: the C++ CPU kernel always, the CUDA kernel when torch has CUDA
and nvcc is present. Build knobs (environment):
  ANCHOR_KERNELS_SKIP_CUDA=1        build the CPU extension only
  ANCHOR_KERNELS_CUDA_ARCHS="80;90a"  SM targets (default: 80 and 90a), plus compute_90 PTX that
                                    the driver compiles for newer GPUs (Blackwell and later)
"""
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
CXX_FLAGS = ["-O3", "-fopenmp-simd"]  # the C++ standard is torch's choice


def want_cuda() -> bool:
    if os.environ.get("ANCHOR_KERNELS_SKIP_CUDA") == "1":
        return False
    import torch

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
        )
    return cpp_extension.CppExtension(
        "anchor_kernels._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": CXX_FLAGS},
    )


setup(
    name="anchor_kernels",
    version="0.1.0",
    description="Fused kernels for anchor-word steering of LLM hidden states",
    packages=find_packages(include=["anchor_kernels", "anchor_kernels.*"]),
    package_data={"anchor_kernels": ["lexicons/*.json", "data/*.txt", "data/*.json", "models/fortune/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "packaging"],
    extras_require={"triton": ["triton>=3.0"]},
    ext_modules=[extension()],
    entry_points={
        "console_scripts": ["anchor-kernels=anchor_kernels.cli:main"],
        # vLLM loads every processor in this group by itself (both of its processor interfaces).
        "vllm.logits_processors": ["anchor_steering=anchor_kernels.integrations.vllm:AnchorSteering"],
    },
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

"""nanotronix installation.

`make test` / `make quickstart` install with `pip install --no-build-isolation -e .` into a venv whose torch was
chosen beforehand (CPU 2.13.0 when none is present, the cluster's own when one is). The optional C++/CUDA kernels
in csrc/ are built only when the torch in that environment has CUDA; a CPU machine skips them cleanly.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def find_cublas(cuda_home: str):
    """(include dir, library file) of cuBLAS: the CUDA toolkit's, else the nvidia-cublas wheel's that CUDA builds of
    torch install (a toolkit installed for nvcc alone may have no cuBLAS); None when neither is there."""
    roots = [Path(cuda_home)]
    try:
        import nvidia  # namespace package of NVIDIA's wheels: nvidia/cu13, nvidia/cublas (CUDA 12), ...
        roots += [p for base in nvidia.__path__ for p in sorted(Path(base).iterdir()) if p.is_dir()]
    except ImportError:
        pass
    for root in roots:
        header = root / "include" / "cublas_v2.h"
        libraries = sorted(root.glob("lib*/libcublas.so*"))  # libcublas.so, else libcublas.so.13, ...
        if header.is_file() and libraries:
            return str(header.parent), str(libraries[0])
    return None


def optional_extensions():
    """CUDA extensions from csrc/, only where CUDA torch and nvcc exist (never on the CPU CI machine):
    nanotronix._kernels (the fused elementwise kernels) and nanotronix._wgrad_gemm (the weight-gradient GEMM that
    accumulates into fp32; optional=True: it links cuBLAS, and a machine where that fails still gets _kernels)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    kernels = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    if not kernels or torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    flags = {"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]}
    exts = [CUDAExtension(name="nanotronix._kernels", sources=["csrc/bindings.cpp", *kernels],
                          extra_compile_args=flags)]
    cublas = find_cublas(CUDA_HOME)
    if cublas is None:
        print("setup.py: no cuBLAS header (CUDA toolkit, nvidia-cublas wheel): skipping nanotronix._wgrad_gemm")
    else:
        include, library = cublas
        exts.append(CUDAExtension(name="nanotronix._wgrad_gemm", sources=["csrc/wgrad_gemm.cpp"],
                                  include_dirs=[include], extra_link_args=[library], extra_compile_args=flags,
                                  optional=True))
    class BuildWithOptionalExtensions(BuildExtension):
        """torch's BuildExtension, except that an extension marked optional that fails to build is skipped with a
        warning: torch compiles with ninja, whose failures are RuntimeErrors, which setuptools' own handling of
        `optional` does not catch (the whole build, _kernels included, would fail)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:
                if not ext.optional:
                    raise
                print(f"setup.py: skipping the optional extension {ext.name}: {error}")

    return exts, {"build_ext": BuildWithOptionalExtensions}


ext_modules, cmdclass = optional_extensions()

setup(
    name="nanotronix",
    version="0.1.0",
    description="Megatron-style 3D-parallel pre-training of SmolLM2-family models",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nanotronix", "nanotronix.*"]),
    install_requires=[
        "torch>=2.11",
        "numpy>=1.26",
        "pyyaml>=6",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "tqdm>=4.66",
    ],
    extras_require={
        "data": ["zarr>=3", "pyarrow>=15", "zstandard>=0.22", "fsspec>=2024.1"],
        "plot": ["matplotlib>=3.8"],
        "dali": ["nvidia-dali-cuda120==2.4.0"],
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-timeout>=2", "transformers>=4.45",
                 "zarr>=3", "pyarrow>=15", "zstandard>=0.22", "fsspec>=2024.1", "matplotlib>=3.8"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

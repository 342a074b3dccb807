"""nanotronix installation.

`make test` / `make quickstart` install with `pip install --no-build-isolation -e .` into a venv whose torch was
chosen beforehand (CPU 2.13.0 when none is present, the cluster's own when one is). The optional C++/CUDA kernels
in csrc/ are built only when the torch in that environment has CUDA; a CPU machine skips them cleanly.
"""
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def optional_extensions():
    """The CUDA extension from csrc/ (nanotronix._kernels, the fused elementwise kernels), only where CUDA torch
    and nvcc exist (never on the CPU CI machine)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    kernels = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    if not kernels or torch.version.cuda is None:
        return [], {}
    if CUDA_HOME is None:  # CUDA torch, yet no CUDA toolkit found: said, as the kernels are then silently absent
        print("note: CUDA torch but no CUDA toolkit (nvcc) found: the csrc/ kernels are not built (set CUDA_HOME)",
              file=sys.stderr)
        return [], {}
    flags = {"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]}
    return ([CUDAExtension(name="nanotronix._kernels", sources=["csrc/bindings.cpp", *kernels],
                           extra_compile_args=flags)],
            {"build_ext": BuildExtension})


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
        # transformers pinned: the import's checks of config.json and generation_config.json mirror this release's
        # (tests/test_hf_config_types.py, test_hf_generation_config.py hold them to it); a newer one (near daily) is
        # taken by raising the pin and running those tests, not by CI picking it up one day
        "test": ["pytest>=8", "pytest-xdist>=3.6", "pytest-timeout>=2", "hypothesis>=6.100", "transformers==5.25.0",
                 "zarr>=3", "pyarrow>=15", "zstandard>=0.22", "fsspec>=2024.1", "matplotlib>=3.8", "wandb>=0.19",
                 "tensorboard>=2.16",
                 # the token stores against the code of the tools that made SmolLM2's and Megatron's datasets
                 "datatrove>=0.10", "megatron-core>=0.16"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""Build of the CPU quantized-matmul extension (worker_orcd.kernels.cpu._qcpu); everything else
is in pyproject.toml. The extension is optional: if it does not compile, the install goes on and
the CPU path falls back to torch (with a warning at load)."""

from __future__ import annotations

from setuptools import Extension, setup

SRC = "worker_orcd/kernels/cpu/csrc/"

setup(
    ext_modules=[
        Extension(
            "worker_orcd.kernels.cpu._qcpu",
            sources=[
                SRC + f"qcpu_{name}.c"
                for name in ("module", "pool", "layer", "scalar", "avx2", "avx512")
            ],
            depends=[SRC + "qcpu.h"],
            # Each ISA file selects its own target by pragma; the module picks one at run time.
            # No contraction into fused multiply-adds: the dequantizers must round as gguf-py.
            extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-Wall", "-ffp-contract=off"],
            extra_link_args=["-pthread"],
            libraries=["m"],
            optional=True,
        )
    ]
)

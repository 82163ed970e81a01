"""Builds dsv3's native CPU kernels (`dsv3.kernels.native._kernels`), a plain C shared object with no
torch headers (the build needs only a C compiler; torch is not a build requirement). The extension is
optional: without a compiler `pip install .` still succeeds, and dsv3 runs today's torch paths and says
so in one line (`dsv3 info` lists the kernel path per format). Everything else is in pyproject.toml."""

from setuptools import Extension, setup

NATIVE = "src/dsv3/kernels/native"

setup(
    ext_modules=[
        Extension(
            "dsv3.kernels.native._kernels",
            sources=[f"{NATIVE}/dsv3_kernels.c"],
            depends=[f"{NATIVE}/body.h", f"{NATIVE}/dispatch.h"],
            # no -march: each ISA's kernels carry their own target pragma and are dispatched at run time
            extra_compile_args=["-O3", "-std=c11", "-fno-math-errno"],
            libraries=["m"],
            optional=True,
        )
    ]
)

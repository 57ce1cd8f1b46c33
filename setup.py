"""The C part of amisbench: exact mask counts for the metrics (amisbench/_counts.c).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler the package
installs without it and amisbench.metrics counts with torch/numpy instead (the same numbers, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "amisbench._counts",
            sources=["amisbench/_counts.c"],
            extra_compile_args=["-O3", "-std=c99"],
            optional=True,
        )
    ]
)

"""Only the optional C kernel lives here; everything else is in pyproject.toml.

The kernel speeds up prompts on x86-64 CPUs with AVX2 (docs/performance.md). It is optional: where it cannot be built
(no compiler, another architecture) the install goes on and the app prefills through onnxruntime alone.
"""

import platform

from setuptools import Extension, setup

X86 = platform.machine().lower() in ("x86_64", "amd64")
kernels = [Extension("appliance.kernels._prompt_kernels", ["appliance/kernels/prompt_kernels.c"],
                     extra_compile_args=["-O3"], optional=True)] if X86 and platform.system() == "Linux" else []

setup(ext_modules=kernels)

"""Only the optional C kernel lives here; everything else is in pyproject.toml.

The kernels speed up prompts on x86-64 CPUs with AVX2 or AVX-512 VNNI, chosen at run time (docs/performance.md). They
are optional: where they cannot be built (no compiler, another architecture: nothing is compiled off x86-64 Linux) the
install goes on and the app runs on onnxruntime's kernels alone.
"""

import platform

from setuptools import Extension, setup

X86 = platform.machine().lower() in ("x86_64", "amd64")
# The kernel uses only the stable ABI (it is loaded through ctypes; the module is empty), so one build serves every
# CPython from 3.10 on: the .deb's wheelhouse installs the same wheel on each system's Python (installers/wheelhouse.sh).
kernels = [Extension("appliance.kernels._prompt_kernels", ["appliance/kernels/prompt_kernels.c"],
                     extra_compile_args=["-O3"], define_macros=[("Py_LIMITED_API", "0x030A0000")],
                     py_limited_api=True, optional=True)] if X86 and platform.system() == "Linux" else []

setup(ext_modules=kernels, options={"bdist_wheel": {"py_limited_api": "cp310"}} if kernels else {})

"""Build of the compiled core (wire kernels and socket transport) and the bincode kernels. Metadata lives in pyproject.toml.

Environment switches:
    HINTENS_NO_EXTENSIONS=1  build without the extension (the pure-Python core is used).
    HINTENS_DEBUG=1          line tracing, debug info and symbols, and an annotated HTML listing
                             (cython -a), for profiling. Other builds carry no debug info and
                             are stripped: about 0.6 MB of extensions instead of 3.7 MB.
    HINTENS_WERROR=1         C compiler warnings are errors (set by `make test`).

The sdist is every tracked file (setuptools-scm) less two things setuptools would add: the C
that Cython generates (setup.py always runs Cython, a build requirement, so that C would never
be compiled) and the egg-info (PKG-INFO at the top carries the version and the metadata).
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist

#: Cython, then the C compiler, for the three extensions side by side, one job per usable core
#: (on 2 cores about 19 s instead of 24 s; each build of the wheel and each editable install).
JOBS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _extensions():
    if _flag("HINTENS_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    debug = _flag("HINTENS_DEBUG")
    # Wheels run on any x86-64: never -march=native. The CRC kernel picks PCLMULQDQ or
    # VPCLMULQDQ (on ymm, or on zmm with AVX-512) at run time through per-function target
    # attributes.
    cflags = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
    if _flag("HINTENS_WERROR"):
        cflags.append("-Werror")
    # Python's own CFLAGS carry -g; -g0 after them wins. -s drops the symbol table too (the
    # exported PyInit_ functions stay in the dynamic one), for in-place builds and wheels alike.
    ldflags = [] if debug else ["-s"]
    if not debug:
        cflags.append("-g0")
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if debug else []
    # Two layers, two extensions: the wire kernels (CRC16, header, decoder), and the socket
    # transport, which cimports their types and inline helpers from hintens/wire/_wire.pxd.
    wire = Extension(
        "hintens.wire._wire",
        ["hintens/wire/_wire.pyx"],
        include_dirs=["hintens/wire"],
        depends=["hintens/wire/_wire.h", "hintens/wire/_crc16.h", "hintens/wire/_crc16_threads.h",
                 "hintens/wire/_wire.pxd"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        define_macros=macros,
    )
    transport = Extension(
        "hintens.transport._channel",
        ["hintens/transport/_channel.pyx"],
        include_dirs=["hintens/wire", "hintens/transport"],
        depends=["hintens/wire/_wire.h", "hintens/wire/_wire.pxd",
                 "hintens/transport/_channel.pxd", "hintens/transport/_writer.pxi",
                 "hintens/transport/_outbox.pxi",
                 "hintens/transport/_memory.pxi", "hintens/transport/_ring.pxi",
                 "hintens/transport/_ring.h"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        define_macros=macros,
    )
    kernels = Extension(
        "hintens._bincode",
        ["hintens/_bincode.pyx"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        define_macros=macros,
    )
    return cythonize(
        [wire, transport, kernels],
        compiler_directives={"language_level": "3", "embedsignature": True, "linetrace": debug},
        annotate=debug,
        nthreads=JOBS if JOBS > 1 else 0,
    )


class _BuildExt(build_ext):
    def finalize_options(self):
        if self.parallel is None:   # `build_ext --parallel N` (or -j N) still decides
            self.parallel = JOBS
        super().finalize_options()


class _Sdist(sdist):
    def make_release_tree(self, base_dir, files):
        def generated(path):
            return (path.startswith("hintens/") and path.endswith(".c")) \
                or ".egg-info/" in path
        super().make_release_tree(base_dir, [path for path in files if not generated(path)])


setup(ext_modules=_extensions(), cmdclass={"build_ext": _BuildExt, "sdist": _Sdist})

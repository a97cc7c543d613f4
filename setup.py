"""Builds attn's Python package with CMake (the same tree as the library; see pyproject.toml).

The extension attn._core is the CMake target attn_python. A fresh build configures a Release tree
in setuptools' build_temp with only the library, the models and the Python module; set
ATTN_CMAKE_BUILD_DIR to an existing configured build tree to reuse it (scripts/test.sh does).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build_dir = Path(os.environ.get("ATTN_CMAKE_BUILD_DIR") or Path(self.build_temp) / "cmake")
        build_dir = build_dir.resolve()
        if not (build_dir / "CMakeCache.txt").exists():
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            subprocess.run(
                ["cmake", "-S", str(ROOT), "-B", str(build_dir), *generator,
                 "-DCMAKE_BUILD_TYPE=Release", "-DATTN_BUILD_TESTS=OFF",
                 "-DATTN_BUILD_BENCHMARKS=OFF", "-DATTN_BUILD_EXAMPLES=OFF",
                 "-DATTN_BUILD_TOOLS=OFF", "-DATTN_BUILD_PYTHON=ON",
                 f"-DPython3_EXECUTABLE={sys.executable}"],
                check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "attn_python",
                        "--parallel", jobs], check=True)
        built = sorted((build_dir / "python" / "attn").glob("_core*.so"))
        if not built:
            raise RuntimeError(f"the CMake build in {build_dir} produced no attn/_core*.so")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[-1], target)


# setuptools' own scratch space: not build/, which is CMake's conventional build tree.
setup(ext_modules=[CMakeExtension("attn._core")], cmdclass={"build_ext": CMakeBuild},
      options={"build": {"build_base": "build-python"}})

"""The compiled core's own C++ test (csrc/tests/core_test.cpp), built and run through CMake/CTest
without Python bindings; skipped only where cmake or a C++ compiler is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake is not installed")
@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler")
def test_core_cpp_test_builds_and_passes_under_ctest(tmp_path):
    build = tmp_path / "build"
    _run(["cmake", "-S", str(ROOT), "-B", str(build), "-DCAI_FAST_BUILD_PYTHON=OFF",
          "-DCAI_FAST_BUILD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release"], ROOT)
    _run(["cmake", "--build", str(build), "-j2"], ROOT)
    _run(["ctest", "--output-on-failure"], build)

"""The C++ unit tests of the torch-free kernel headers (CMakeLists.txt), built and run with CMake."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cpp_unit_tests(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   capture_output=True, text=True, timeout=300)
    out = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    out = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    assert "tests passed" in out.stdout

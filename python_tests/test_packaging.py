"""Packaging: the sdist carries what a wheel build needs, setup.py explains a missing torch, and
an extension built for another torch is refused at import with a clear message."""
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git_files(*paths):
    out = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_sdist_carries_every_native_source_and_no_fixture(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = _git_files("csrc", "anchor_kernels/lexicons", "anchor_kernels/data") | {
        "CMakeLists.txt", "LICENSE", "pyproject.toml", "setup.py", "README.md"}
    assert needed - names == set()
    assert not [n for n in names if "fortune/" in n or n.endswith((".so", "_build_info.py"))]


def test_setup_without_torch_says_how_to_build():
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0
    assert "--no-build-isolation" in run.stderr and "Install torch first" in run.stderr


def test_extension_built_for_another_torch_is_refused(tmp_path):
    # A stand-in _build_info (as a wheel built for torch 1.0 carries it), put ahead of the real one.
    code = ("import sys, types; info = types.ModuleType('anchor_kernels._build_info'); "
            "info.TORCH_VERSION = '1.0.0+cpu'; sys.modules['anchor_kernels._build_info'] = info; "
            "import anchor_kernels")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode != 0
    assert "built for torch 1.0.0+cpu" in run.stderr and "Install torch==1.0.*" in run.stderr


def test_extension_built_for_this_torch_loads(tmp_path):
    code = "import anchor_kernels, torch; from anchor_kernels import native; print(native.available())"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"

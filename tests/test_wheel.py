"""The package as users get it: ``python -m build`` makes an sdist and a wheel carrying the C++
sources, the Triton kernels and the shipped datasets; the wheel installs into a fresh venv,
imports, builds the fused CPU kernel from its own sources and takes a step equal to the
reference loop.

The fresh venv sees the running torch (and numpy) through a ``.pth`` file instead of
installing them again, so the test stays offline and takes seconds; lionopt itself must come
from the wheel (checked).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
import torch

from support import fused_available

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lionopt"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("build") is None or importlib.util.find_spec("setuptools") is None,
    reason="needs the 'build' and 'setuptools' packages (pip install -e '.[test]')",
)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return out


def _shipped_files() -> list[str]:
    """Package files that are not Python and must ship: C++ sources and the datasets."""
    files = [
        *PACKAGE.rglob("*.cpp"),
        *PACKAGE.rglob("*.h"),
        *(PACKAGE / "tasks" / "data").iterdir(),
    ]
    return sorted(str(p.relative_to(PACKAGE.parent)) for p in files if p.is_file())


def test_wheel_and_sdist_carry_sources_kernels_and_data(dist):
    (wheel,) = dist.glob("lionopt-*.whl")
    (sdist,) = dist.glob("lionopt-*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _shipped_files()
    assert any(name.endswith(".cpp") for name in expected)
    triton = sorted(
        str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if "triton" in p.name
    )
    assert triton, "no Triton kernel modules found"
    for name in [*expected, *triton, "lionopt/integrations/timm.py"]:
        assert name in names, name
    assert any(n.endswith("licenses/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
    for extra in ("compare", "gpu", "bench", "test", "hf", "lightning", "timm", "integrations"):
        assert f"Provides-Extra: {extra}" in text, extra
    assert "Project-URL:" in text and "Classifier:" in text
    with tarfile.open(sdist) as archive:
        members = set(archive.getnames())
    root = sdist.name[: -len(".tar.gz")]
    for name in [*(f"src/{n}" for n in expected), "LICENSE", "constraints.txt"]:
        assert f"{root}/{name}" in members, name


def test_wheel_installs_in_a_fresh_venv_builds_the_kernel_and_steps(dist, tmp_path):
    (wheel,) = dist.glob("lionopt-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=_clean_env(),
    ).stdout.strip()
    # torch and numpy from the running environment, after the venv's own site-packages
    torch_site = Path(torch.__file__).resolve().parents[1]
    Path(site, "outer_torch.pth").write_text(f"{torch_site}\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--no-cache-dir",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
    )
    assert install.returncode == 0, (install.stdout + install.stderr)[-3000:]

    require_fused = fused_available("cpu") or os.environ.get("LIONOPT_REQUIRE_FUSED") == "1"
    code = f"""
        import torch, lionopt
        from pathlib import Path
        from lionopt.kernels.cpu import dispatch, plain
        # Not the C++ dispatch: its build (25 s, torch headers) would outlive this process.
        dispatch._library.state = False
        assert Path(lionopt.__file__).resolve().is_relative_to(Path({str(env_dir)!r}).resolve()), \
            lionopt.__file__
        if {require_fused}:
            assert plain.available(), "the fused kernel did not build from the wheel"
            assert plain.build_info()["compiled"], plain.build_info()
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(257, 33))
        q = torch.nn.Parameter(p.detach().clone())
        opt = lionopt.Lion([p], lr=1e-2, weight_decay=0.1)
        ref = lionopt.Lion([q], lr=1e-2, weight_decay=0.1, foreach=False, fused=False)
        for _ in range(5):
            g = torch.randn(257, 33)
            p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
        assert torch.equal(p, q) and torch.equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])
        print("OK")
    """
    result = subprocess.run(
        [str(python), "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(LIONOPT_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1"),
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
    cli = subprocess.run(
        [str(env_dir / "bin" / "lionopt"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(),
    )
    assert cli.returncode == 0 and "compare" in cli.stdout, cli.stderr[-2000:]

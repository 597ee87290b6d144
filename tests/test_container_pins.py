"""Packaging test: `pip install -e .` inside an NGC container keeps the container's torch, Transformer
Engine, apex and Megatron-Core.

No container (and no GPU) is needed: for each image in tests/container_pins.json a throwaway venv
is given the image's torch / megatron-core / transformer-engine / apex as *installed distributions*
(a minimal ``.dist-info`` with METADATA, which is all pip looks at; NGC's torch builds such as
``2.11.0a0+eb65b36914.nv26.02`` are not on PyPI anyway). Then ``pip install --dry-run --report``
of this package runs against PyPI, and the JSON report must not list any of them: pip's resolver
keeps an installed distribution that satisfies every requirement, so an empty "would install"
entry for a package is exactly "the container's copy is kept".

Needs network access to PyPI (skipped with the reason when pypi.org is unreachable); about a minute.
Run it alone with:  python -m pytest tests/test_container_pins.py -m packaging
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.packaging

REPO = Path(__file__).resolve().parents[1]
PINS = json.loads((Path(__file__).with_name("container_pins.json")).read_text())["containers"]


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _python_for(version: str) -> str:
    """An interpreter of the container's Python minor version (PATH, then pyenv), else this one."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which(f"python{version}")]
    candidates += [str(p / "bin" / "python") for p in sorted(pyenv.glob(f"{version}.*"), reverse=True)]
    for exe in filter(None, candidates):
        probe = subprocess.run(
            [exe, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return exe
    return sys.executable


def _fake_dist(site: Path, name: str, version: str, requires: list[str]) -> None:
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    (dist / "METADATA").write_text("\n".join(meta) + "\n")
    (dist / "INSTALLER").write_text("ngc-simulated\n")
    (dist / "RECORD").write_text("")


def _our_requirement(name: str) -> Requirement | None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        if canonicalize_name(req.name) == canonicalize_name(name):
            return req
    return None


def _start_dry_run(image: str, spec: dict, work: Path) -> tuple[subprocess.Popen, Path]:
    """Venv with the image's stack as installed distributions, then `pip install --dry-run -e`."""
    python = _python_for(spec["python"])
    venv = work / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )
    for name, dist in spec["installed"].items():
        _fake_dist(site, name, dist["version"], dist.get("requires", []))

    # Only the project metadata matters to the resolver: copy pyproject + README (the readme
    # field) and an empty package, so the build never writes into the working tree.
    src = work / "src"
    (src / "minitron_nemo").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    (src / "minitron_nemo" / "__init__.py").write_text("")

    report = work / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    proc = subprocess.Popen(
        [str(vpy), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
         "--index-url", "https://pypi.org/simple", "-e", str(src)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    return proc, report


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One dry run per image, all started at once (they mostly wait on PyPI)."""
    if not _pypi_reachable():
        pytest.skip("packaging test needs network access to pypi.org")
    started = {
        image: _start_dry_run(image, spec, tmp_path_factory.mktemp("ngc"))
        for image, spec in PINS.items()
    }
    done = {}
    for image, (proc, report) in started.items():
        out, _ = proc.communicate(timeout=600)
        done[image] = (proc.returncode, out, report)
    return done


@pytest.mark.parametrize("image", sorted(PINS))
def test_pip_install_keeps_container_stack(image, reports):
    spec = PINS[image]
    returncode, out, report = reports[image]
    assert returncode == 0, f"pip could not resolve in {image}:\n{out}"

    would_install = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert "minitron-nemo" in would_install  # the report really is about our package
    keep = {canonicalize_name(n) for n in spec["must_keep"]}
    replaced = {n: v for n, v in would_install.items() if n in keep}
    assert not replaced, (
        f"`pip install -e .` in {image} would replace the container's {replaced} "
        f"(installed: { {n: d['version'] for n, d in spec['installed'].items()} })"
    )
    for name in spec.get("may_install", []):
        # Not in the image: pip adds it, and it must be a version our pyproject allows.
        req = _our_requirement(name)
        version = would_install.get(canonicalize_name(name))
        assert version is not None, f"{name} is not in {image}, so pip must install it"
        assert req is not None and req.specifier.contains(Version(version)), (name, version, str(req))

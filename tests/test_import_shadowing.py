"""No folder of the repository may stand in for a module an installed distribution provides.

`python -m pytest`, `python -m ragcache.cli` and any `python -c` started at the repository
root put the root first on sys.path. The top-level folders `kernels/` and `storage/` are
source folders of `ragcache.kernels` and `ragcache.storage`, not packages: were they
packages, `import kernels` (Hugging Face's, which transformers >= 5.25 imports at start-up)
would load ours. These tests start fresh interpreters so nothing already imported hides it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter with the repository root first on sys.path. Prints, as JSON, each
# module that resolved (or whose import failed) inside the repository, and how many were tried.
_PROBE = r"""
import importlib, importlib.metadata as md, importlib.util, json, os, sys, traceback
from pathlib import Path
from packaging.requirements import Requirement

root = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(root))
# ragcache itself (ragcache/kernels and ragcache/storage included: paths are compared as imported,
# symlinks not followed), and the virtual environment when it lies inside the repository (.venv)
allowed = [root / "ragcache", Path(os.path.abspath(sys.prefix))]


def in_repo(path):
    if not path or not Path(path).is_absolute():  # "<frozen importlib._bootstrap>", "<string>"
        return False
    p = Path(os.path.abspath(path))
    return p.is_relative_to(root) and not any(p.is_relative_to(a) for a in allowed)


def closure(name, extras, seen):
    # ragcache and every distribution it depends on (its extras included), recursively
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return
    seen[key] = dist
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
            closure(req.name, set(req.extras), seen)


dists = {}
closure("ragcache", {"", "dev"}, dists)
provided = {}
for module, names in md.packages_distributions().items():
    for name in names:
        if name.lower().replace("_", "-") in dists and module.isidentifier():
            provided[module] = name

found = []
for module in sorted(provided):
    if module == "ragcache":
        continue
    spec = importlib.util.find_spec(module)
    places = [spec.origin] + list(spec.submodule_search_locations or []) if spec else []
    if any(in_repo(p) for p in places):
        found.append({"module": module, "dist": provided[module], "resolved": places})
for module in sorted(provided) + ["transformers.activations"]:
    try:
        importlib.import_module(module)
    except BaseException as exc:
        frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
        if any(in_repo(f) for f in frames) or in_repo(getattr(exc, "path", None)):
            found.append({"module": module, "error": repr(exc)})


def places_of(mod):
    try:
        return [getattr(mod, "__file__", None), *(getattr(mod, "__path__", None) or [])]
    except TypeError:  # a module object that is not a module (some packages install proxies)
        return []


leaked = sorted(m for m, mod in list(sys.modules.items()) if any(in_repo(p) for p in places_of(mod)))
print(json.dumps({"tried": len(provided), "found": found, "leaked": leaked,
                  "kernels": "kernels" in provided}))
"""


def _probe(cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT)], cwd=cwd, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_installed_module_resolves_into_the_repository_with_the_root_first_on_sys_path():
    report = _probe(ROOT)
    assert report["kernels"], "Hugging Face kernels (a transformers dependency) should be installed"
    assert report["tried"] > 50
    assert report["found"] == []
    assert report["leaked"] == []


def test_test_helpers_shadow_no_installed_or_standard_module():
    """pytest puts tests/ first on sys.path: its helper modules' names must be taken by nobody."""
    import importlib.metadata as md

    taken = set(md.packages_distributions()) | set(sys.stdlib_module_names)
    helpers = {p.stem for p in (ROOT / "tests").glob("*.py")}
    assert helpers & taken == set()


def _run_at_root(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_python_c_at_the_repository_root_imports_hugging_face_kernels():
    printed = _run_at_root("-c", "import transformers.activations, kernels; print(kernels.__file__)")
    assert not Path(printed.strip()).resolve().is_relative_to(ROOT / "kernels")


def test_python_m_ragcache_cli_at_the_repository_root_starts():
    assert "serve" in _run_at_root("-m", "ragcache.cli", "--help")

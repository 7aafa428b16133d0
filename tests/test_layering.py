"""The layering `cluster -> engine -> kernels` holds: checked on the source, import by import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> list[str]:
    """Absolute module names imported by a file (relative imports resolved in its package)."""
    parts = path.relative_to(ROOT).parts
    here = ".".join(["rayfleet", *parts[:-1]])
    return imports_in_source(path.read_text(), here)


def imports_in_source(source: str, here: str) -> list[str]:
    tree = ast.parse(source)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                mod = base + ("." + node.module if node.module else "")
                names += [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                names.append(node.module or "")
    return names


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(
    "path", files("engine") + files("kernels"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_engine_and_kernels_import_no_ray_http_or_cluster(path):
    bad = [
        n
        for n in imports_of(path)
        if _top(n) in {"ray", "fastapi", "starlette", "uvicorn"} or n.startswith("rayfleet.cluster")
    ]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", files("kernels"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_import_nothing_from_engine(path):
    bad = [n for n in imports_of(path) if n.startswith("rayfleet.engine")]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", files("cluster"), ids=lambda p: str(p.relative_to(ROOT)))
def test_cluster_uses_only_the_engines_public_names(path):
    bad = [
        n
        for n in imports_of(path)
        if n.startswith("rayfleet.engine.") and n.split(".")[2] not in _public_engine_names()
    ]
    bad += [n for n in imports_of(path) if n.startswith("rayfleet.kernels")]
    assert not bad, f"{path.relative_to(ROOT)} reaches past rayfleet.engine's __init__: {bad}"


def _public_engine_names() -> set[str]:
    tree = ast.parse((ROOT / "engine" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", "") == "__all__" for t in node.targets
        ):
            return {elt.value for elt in node.value.elts} | {"default_model_path"}
    return set()


def test_block_hash_is_pure_python():
    names = imports_of(ROOT / "engine" / "block_hash.py")
    assert all(
        _top(n) in {"__future__", "struct", "collections", "xxhash", "hashlib"} for n in names
    ), names


def test_the_checker_sees_a_violation():
    """The rule can fail: ray and a relative import of cluster are both seen."""
    names = imports_in_source("import ray\nfrom ..cluster import app\n", "rayfleet.engine")
    assert "ray" in names and "rayfleet.cluster.app" in names


def test_top_level_kernels_from_the_checkout_is_the_installed_package():
    """From the checkout's root (as `python -m`, pytest and the Ray workers of a driver
    started there see it), top-level `kernels` is Hugging Face's package, which transformers
    imports, not this repo's folder; `rayfleet.kernels` is still ours."""
    import importlib.metadata
    import subprocess
    import sys

    code = "import kernels, rayfleet.kernels as ours; print(kernels.__file__, ours.__file__)"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:  # older transformers: not installed
        assert run.returncode != 0 and "import it as rayfleet.kernels" in run.stderr
        return
    assert run.returncode == 0, run.stderr
    top, ours = (Path(p).resolve() for p in run.stdout.split())
    installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    assert top == Path(str(installed)).resolve() != ours
    assert ours == ROOT / "kernels" / "__init__.py"

"""The development package (nightingale/dev/): the runtime never imports it, and
`nightingale dev` reaches it.

Every module of every installed package except nightingale.dev (pyproject.toml's package
list and package-dir mapping) is parsed, and each import statement, at module level or
inside a function, is resolved to an absolute module name; none may name nightingale.dev.
The only way into it is the `nightingale dev` command's handler, a string the CLI imports
when that command runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

from .helpers.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
DEV = "nightingale.dev"
DEV_HANDLER = "nightingale.dev.cli:dev_main"  # nightingale/cli.py routes `nightingale dev` here


def _packages() -> dict[str, Path]:
    """Installed package name -> its folder, as pyproject.toml maps them."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setuptools["package-dir"]
    return {name: REPO / folders.get(name, name.replace(".", "/")) for name in setuptools["packages"]}


def _modules(package: str, folder: Path) -> dict[str, Path]:
    """Module name -> file, for the .py files directly in `folder` (subpackages are listed
    as packages of their own)."""
    return {package if f.stem == "__init__" else f"{package}.{f.stem}": f for f in sorted(folder.glob("*.py"))}


def _runtime_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, folder in _packages().items():
        if package != DEV and not package.startswith(DEV + "."):
            modules |= _modules(package, folder)
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Absolute names of every module an import statement in `path` names (for `from X
    import y`, both X and X.y: y may be a submodule)."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def _is_dev(name: str) -> bool:
    return name == DEV or name.startswith(DEV + ".")


def test_the_walk_sees_every_runtime_package_and_resolves_relative_imports():
    modules = _runtime_modules()
    for name in ("nightingale.cli", "nightingale.protocol", "nightingale.models.hub", "nightingale.models.torchpickle",
                 "nightingale.models.s3gen.flow", "nightingale.daemon.server", "nightingale.client.nsay"):
        assert name in modules, name
    assert not any(_is_dev(name) for name in modules)
    # The walker would notice: the dev package's own relative imports resolve into it.
    dev = _modules(DEV, _packages()[DEV])
    assert "nightingale.dev.checkpoint" in imported_names("nightingale.dev.cli", dev["nightingale.dev.cli"])
    assert "nightingale.dev.torchsave" in imported_names("nightingale.dev.checkpoint", dev["nightingale.dev.checkpoint"])
    assert "nightingale.models.loading" in imported_names("nightingale.models.turbo", modules["nightingale.models.turbo"])


def test_no_runtime_module_imports_the_dev_package():
    offenders = {
        f"{path.relative_to(REPO)}: {name}"
        for module, path in _runtime_modules().items()
        for name in imported_names(module, path)
        if _is_dev(name)
    }
    assert not offenders, sorted(offenders)


def test_only_the_cli_handler_names_the_dev_package():
    """No importlib detour either: the one string naming nightingale.dev is the handler."""
    mentions = {
        (str(path.relative_to(REPO)), node.value)
        for path in _runtime_modules().values()
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(DEV)
    }
    assert mentions == {("nightingale/cli.py", DEV_HANDLER)}


def test_nightingale_dev_make_checkpoint_writes_the_generators_files(tiny_checkpoint, tmp_path):
    res = run_cli("dev", "make-checkpoint", str(tmp_path / "ckpt"), "--seed", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "ckpt")
    written = sorted(f.name for f in (tmp_path / "ckpt").iterdir())
    assert written == sorted(f.name for f in tiny_checkpoint.iterdir())
    for name in written:
        assert (tmp_path / "ckpt" / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name

"""The packages import one way: rdrop/ (the training library) never imports models/ or data/, and
models/ imports nothing of rdrop/ but its errors. Glue that needs both lives in the entry points."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imported_modules(folder):
    """(file, module) for every import in the files of the package in `folder`, relative imports resolved."""
    package, found = folder.name, []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path.name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = f"{package}.{node.module or ''}".rstrip(".") if node.level else node.module
                found += [(path.name, f"{module}.{alias.name}") for alias in node.names]
    return found


def top_level(module):
    return module.split(".")[0]


def test_rdrop_imports_neither_models_nor_data():
    crossing = [
        (file, module) for file, module in imported_modules(ROOT / "rdrop") if top_level(module) in ("models", "data")
    ]
    assert crossing == []


def test_models_import_only_errors_from_rdrop():
    crossing = [
        (file, module)
        for file, module in imported_modules(ROOT / "models")
        if top_level(module) == "rdrop" and not module.startswith("rdrop.errors")
    ]
    assert crossing == []


def test_the_check_sees_imports_in_every_form(tmp_path):
    """The parser the two tests above rely on finds the forms an import can take."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text(
        "import rdrop.runtime\nfrom rdrop import checkpoint\nfrom . import b\ndef f():\n    import models.vit\n"
    )
    assert imported_modules(package) == [
        ("a.py", "rdrop.runtime"),
        ("a.py", "rdrop.checkpoint"),
        ("a.py", "pkg.b"),
        ("a.py", "models.vit"),
    ]

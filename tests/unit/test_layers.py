"""The dependency direction of DESIGN.md, checked on the source: wire -> engine -> ledger."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "processor"

# layer -> module prefixes it must never import
FORBIDDEN = {
    "engine": (
        "lmdb",
        "asyncio",
        "uvloop",
        "prometheus_client",
        "aiohttp",
        "logging",
        "time",
        "processor.server",
        "processor.api",
        "processor.sim",
        "processor.ledger.store",
        "processor.authorizer",
        "random",
        "os",
        "socket",
    ),
    "wire": (
        "lmdb",
        "asyncio",
        "prometheus_client",
        "aiohttp",
        "processor.ledger",
        "processor.engine",
        "processor.server",
        "processor.api",
        "processor.authorizer",
    ),
    "ledger": (
        "asyncio",
        "iso8583",
        "processor.wire",
        "processor.engine",
        "processor.server",
        "processor.api",
        "processor.sim",
        "processor.authorizer",
        "prometheus_client",
    ),
    "sim": (
        "processor.server",
        "processor.ledger",
        "processor.engine",
        "processor.authorizer",
        "processor.api",
        "lmdb",
    ),
}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer: str) -> None:
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files, f"no modules in processor/{layer}"
    offending = [
        f"{path.name} imports {name}"
        for path in files
        for name in imports_of(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer])
    ]
    assert not offending, offending

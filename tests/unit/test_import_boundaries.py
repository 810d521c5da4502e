"""The package layering of services/: every import (module-level or inside a function) of every module, read off
the source, must follow it, and the packages form no cycle. Importing a stage package never loads the gateway;
the gateway reaches the stages only through Ray handles and the protos."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"
STAGES = {"vision_encoder", "audio_encoder", "llm_core", "tts_decoder"}
# package -> the services packages it may import (besides itself)
ALLOWED = {
    "runtime": set(),
    "common": {"runtime"},
    **{stage: {"common", "runtime"} for stage in STAGES},
    "gateway": {"common", "runtime"},
    "client": {"common"},
    "app": {"common", "runtime", "gateway", "client", *STAGES},
}


def imported_packages(path: Path) -> set[str]:
    """The services.* packages a module imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "services" and len(parts) > 1:
                found.add(parts[1])
    return found


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SERVICES.rglob("*.py"):
        package = path.relative_to(SERVICES).parts[0]
        if package.endswith(".py"):
            continue
        graph.setdefault(package, set()).update(imported_packages(path) - {package})
    return graph


def test_every_package_imports_only_what_its_layer_allows():
    graph = package_graph()
    assert set(graph) == set(ALLOWED), "a new services/ package needs its place in ALLOWED"
    for package, imports in graph.items():
        assert imports <= ALLOWED[package], f"services.{package} imports {sorted(imports - ALLOWED[package])}"


def test_no_cycle_between_packages():
    graph = package_graph()
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, (*path, node))
        done.add(node)

    for package in graph:
        visit(package, ())


@pytest.mark.parametrize("module", [f"services.{s}.deployment" for s in sorted(STAGES)] + ["services.gateway.deployment"])
def test_importing_a_deployment_loads_no_other_side(module):
    """What Ray imports in a replica: a stage never pulls in the gateway, the gateway never a stage."""
    probe = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[1] for m in sys.modules if m.startswith('services.')}})))"
    loaded = set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split())
    own = module.split(".")[1]
    others = (STAGES | {"gateway", "app", "client"}) - {own}
    assert not loaded & others, f"{module} loads services.{sorted(loaded & others)}"

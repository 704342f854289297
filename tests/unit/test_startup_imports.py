"""A default server (digits, ``mlp``) starts without importing torchvision or scikit-learn.

Both cost seconds of start-up (torchvision pulls in ``torch._dynamo``): torchvision is imported only
for the ResNet backbones, scikit-learn only where a membership-inference attack runs. The server
starts in a fresh interpreter, since this test process has imported both long before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import ROOT

HEAVY = ("torchvision", "sklearn")

PROBE = textwrap.dedent(
    """
    import json, sys
    from server.app import App
    from server.config import load_config

    settings = {
        "storage.data_dir": sys.argv[1],
        "server.host": "127.0.0.1",
        "server.port": 0,
        "server.metrics_port": -1,
        "auth.enabled": False,
    }
    app = App(load_config(env={}, overrides=settings))
    app.start()
    try:
        print(json.dumps({name: name in sys.modules for name in sys.argv[2:]}))
    finally:
        app.stop(0)
    """
)


def _imported_after_start(data_dir: Path) -> dict[str, bool]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(data_dir), *HEAVY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded: dict[str, bool] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


def test_default_server_starts_without_torchvision_or_sklearn(tmp_path: Path) -> None:
    assert _imported_after_start(tmp_path / "data") == dict.fromkeys(HEAVY, False)


def test_resnet_backbone_still_builds() -> None:
    from server.engine import build_backbone

    model = build_backbone("resnet18", (3, 32, 32), 10)
    assert model.head_name == "fc"
    assert type(model).__module__ == "server.engine.resnet"

"""server.storage stays a leaf: SQLAlchemy, Alembic and the standard library only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_importing_storage_loads_no_grpc_torch_or_prometheus() -> None:
    probe = (
        "import sys, server.storage; "
        "loaded = sorted({name.split('.')[0] for name in sys.modules} & {'grpc', 'torch', 'prometheus_client'}); "
        "print(','.join(loaded))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""

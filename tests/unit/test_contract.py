"""The wire contract: generated code is fresh, names are the normative ones, layering holds."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from protos import lethe_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    (out / "protos").mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT),
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(ROOT / "protos/lethe.proto"),
        ],
        check=True,
    )
    for name in ("lethe_pb2.py", "lethe_pb2.pyi", "lethe_pb2_grpc.py"):
        fresh = (out / "protos" / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run 'make proto' and commit"


def test_normative_names() -> None:
    service = pb.DESCRIPTOR.services_by_name["Lethe"]
    assert pb.DESCRIPTOR.package == "lethe.v1"
    assert set(service.methods_by_name) >= {
        "Learn",
        "Unlearn",
        "Predict",
        "PredictStream",
        "GetJob",
        "WatchJob",
        "CancelJob",
        "ListJobs",
        "GetTask",
        "ListTasks",
        "ListAuditEvents",
        "GetModel",
        "ListEvaluations",
    }
    fields = {
        m: set(pb.DESCRIPTOR.message_types_by_name[m].fields_by_name) for m in pb.DESCRIPTOR.message_types_by_name
    }
    assert fields["Tensor"] >= {"dtype", "shape", "data"}
    assert fields["LearnHeader"] >= {
        "task",
        "idempotency_key",
        "mode",
        "epochs",
        "batch_size",
        "learning_rate",
        "holdout_fraction",
        "metadata",
    }
    assert fields["SampleChunk"] >= {"inputs", "labels", "sample_ids"}
    assert fields["UnlearnRequest"] >= {"task", "reason", "idempotency_key", "method"}
    assert fields["PredictRequest"] >= {"task", "inputs", "return_probabilities", "allow_unlearned"}
    assert fields["PredictResponse"] >= {"outputs", "classes", "model_version"}
    assert fields["Job"] >= {
        "id",
        "kind",
        "state",
        "task",
        "progress",
        "message",
        "model_version",
        "created_at",
        "started_at",
        "finished_at",
        "metrics",
    }
    assert fields["Task"] >= {"name", "state", "samples", "accuracy", "relapse", "learned_version", "unlearned_version"}
    assert fields["AuditEvent"] >= {
        "seq",
        "at",
        "principal",
        "action",
        "task",
        "job_id",
        "details_json",
        "prev_hash",
        "hash",
    }
    assert fields["ModelInfo"] >= {
        "strategy",
        "backbone",
        "version",
        "input_shape",
        "num_classes",
        "parameters",
        "config",
    }
    assert fields["ListAuditEventsRequest"] >= {"after_seq", "limit", "task"}
    assert fields["ListEvaluationsRequest"] >= {"after_job_seq", "limit"}
    assert fields["ListTasksResponse"] == {"tasks"}
    assert fields["ListAuditEventsResponse"] == {"events"}
    assert [pb.DataType.Name(v) for v in range(7)] == [
        "DATA_TYPE_UNSPECIFIED",
        "FLOAT32",
        "FLOAT16",
        "BFLOAT16",
        "FLOAT64",
        "UINT8",
        "INT64",
    ]


def _imports(package: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0] if not node.module.startswith("server.") else node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_engine_imports_only_ml_libraries() -> None:
    forbidden = {"grpc", "sqlalchemy", "prometheus_client", "alembic", "protos", "client"}
    for path, names in _imports(ROOT / "server/engine").items():
        assert not names & forbidden, f"{path} imports {names & forbidden}"
        inner = {n for n in names if n.startswith("server.") and not n.startswith("server.engine")}
        assert not inner, f"{path} imports {inner}: server.engine must not depend on the rest of the server"


def test_imports_point_inward() -> None:
    for path, names in _imports(ROOT / "server/storage").items():
        assert not {"torch", "grpc", "prometheus_client"} & names, path
        assert not {n for n in names if n.startswith(("server.jobs", "server.rpc", "server.engine"))}, path
    for path, names in _imports(ROOT / "server/jobs").items():
        assert not {n for n in names if n.startswith("server.rpc")}, f"{path} imports the RPC layer"
        assert "grpc" not in names, path
    for path, names in _imports(ROOT / "client").items():
        top = {n.split(".")[0] for n in names}
        # cli.py imports server lazily, only for 'lethe serve' and 'lethe db' (the server extra).
        assert not ({"torch", "sqlalchemy"} | (set() if path.endswith("cli.py") else {"server"})) & top, path

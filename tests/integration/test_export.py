"""``lethe export`` against a real ``lethe serve`` process: the exported network answers as Predict does.

The server runs the default strategy (UnCLE, mlp) with authentication on. A task of five digit
classes is learned, so its logits carry ``-inf`` at the other five; the command exports it as ONNX
and TorchScript, and the files, loaded with onnxruntime and ``torch.jit.load``, must give Predict's
classes and logits. Every export is audited; without the admin scope it is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pytest
import torch

from client import InvalidArgumentError, LetheClient, LetheError
from client.cli import main as lethe
from server.rpc import hash_token
from tests.support import deployed_server, digits

ADMIN, TRAINER = "t-admin", "t-trainer"
TOKENS = f"auth.tokens=root:{hash_token(ADMIN)}:admin,trainer:{hash_token(TRAINER)}:learn+predict"


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(LetheError) as error:
        call()
    return error.value.code


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]  # type: ignore[no-any-return]


def _run_torchscript(path: Path, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_lethe_export_gives_the_network_predict_serves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = digits([0, 1, 2, 3, 4])
    with deployed_server(tmp_path / "data", TOKENS, "training.epochs=5", auth=True) as server:
        admin = LetheClient(server.target, token=ADMIN, timeout=60)
        trainer = LetheClient(server.target, token=TRAINER, timeout=60)
        with admin, trainer:
            job = trainer.wait(trainer.learn("low", x, y).id)
            assert job.metrics["task_accuracy"] >= 85  # five classes: chance is 20%
            served = admin.predict("low", x)
            assert np.mean(served.classes == y) >= 0.9
            files = {}
            for fmt, run in (("onnx", _run_onnx), ("torchscript", _run_torchscript)):
                out = tmp_path / "exports" / f"low.{fmt}"
                out.parent.mkdir(exist_ok=True)
                argv = ["export", "--task", "low", "--format", fmt, "--out", str(out)]
                assert lethe([*argv, "--server", server.target, "--token", ADMIN]) == 0
                line = capsys.readouterr().out.strip()
                digest = hashlib.sha256(out.read_bytes()).hexdigest()
                assert line.startswith(f"wrote {out}: {out.stat().st_size} bytes, sha256 {digest}, "), line
                assert f"model version {served.model_version}" in line
                files[fmt] = digest
                logits = run(out, x)
                assert np.array_equal(logits.argmax(axis=1), served.classes), f"{fmt}: classes differ from Predict"
                finite = np.isfinite(served.outputs)
                assert np.array_equal(np.isfinite(logits), finite) and finite.sum(axis=1).tolist() == [5] * len(x)
                np.testing.assert_allclose(logits[finite], served.outputs[finite], atol=1e-4, rtol=0)

            result = admin.export("low", "safetensors", tmp_path / "exports" / "low.safetensors")
            header = result.path.read_bytes()
            metadata = json.loads(header[8 : 8 + int.from_bytes(header[:8], "little")])["__metadata__"]
            assert metadata["strategy"] == "uncle" and metadata["task"] == "low" and metadata["input_shape"] == "1,8,8"
            assert result.model_version == served.model_version and result.input_shape == (1, 8, 8)

            # Without the admin scope: refused, by the client and by the command; nothing is written.
            refused = tmp_path / "refused" / "low.onnx"
            refused.parent.mkdir()
            assert _code(lambda: trainer.export("low", "onnx", refused)) == grpc.StatusCode.PERMISSION_DENIED
            argv = ["export", "--task", "low", "--format", "onnx", "--out", str(refused)]
            assert lethe([*argv, "--server", server.target, "--token", TRAINER]) == 1
            assert "PERMISSION_DENIED" in capsys.readouterr().err
            assert list(refused.parent.iterdir()) == []  # no file, no temporary left behind
            # Requests Predict would refuse are refused alike.
            assert _code(lambda: admin.export("never", "onnx", refused)) == grpc.StatusCode.NOT_FOUND
            with pytest.raises(InvalidArgumentError) as missing:
                admin.export(None, "onnx", refused)
            assert missing.value.field == "task"
            admin.wait(admin.unlearn("low", reason="export test").id)
            assert _code(lambda: admin.export("low", "onnx", refused)) == grpc.StatusCode.FAILED_PRECONDITION

            events = [e for e in admin.audit_events(task="low") if e.action == "model.exported"]
    assert [e.principal for e in events] == ["root"] * 3
    details = [json.loads(e.details_json) for e in events]
    assert [d["format"] for d in details] == ["onnx", "torchscript", "safetensors"]
    assert [d["sha256"] for d in details[:2]] == [files["onnx"], files["torchscript"]]
    assert details[2]["sha256"] == result.sha256 and details[2]["bytes"] == result.bytes
    assert {d["model_version"] for d in details} == {served.model_version}
    assert re.fullmatch(r"[0-9a-f]{64}", details[0]["sha256"])

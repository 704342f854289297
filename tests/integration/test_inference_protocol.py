"""The Open Inference Protocol (KServe v2 gRPC) on a real ``lethe serve`` process, called with ``tritonclient``.

Tasks are learned through the Lethe client; ``tritonclient.grpc`` then asks the same server on the
same port. ModelInfer must give the classes Predict gives for the same rows (logits close), for the
default strategy (``uncle``, task-incremental: model = task name) and for ``lure`` (class-incremental:
one model, ``lethe``); an unlearned task gets an error; with authentication on, only ``predict``
scope may infer while liveness and readiness stay open like health probes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from client import LetheClient
from server.rpc import hash_token
from tests.support import FAST, ROOT, ServerProcess, digits, free_port, stop_deployed_process, wait_ready

TOKENS = {"admin": "t-admin", "trainer": "t-trainer", "reader": "t-reader"}
ENTRIES = (
    f"root:{hash_token(TOKENS['admin'])}:admin",
    f"trainer:{hash_token(TOKENS['trainer'])}:learn",
    f"reader:{hash_token(TOKENS['reader'])}:predict",
)


def _bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKENS[name]}"}


def _infer_input(rows: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    data = np.ascontiguousarray(rows.astype(np.float32 if datatype == "FP32" else np.uint8))
    return triton.InferInput("input", list(rows.shape), datatype).set_data_from_numpy(data)


def _uint8(rows: np.ndarray) -> np.ndarray:
    """Digits in [0, 1] as the bytes a camera would send (Lethe scales UINT8 by 1/255)."""
    return np.round(rows * 255).astype(np.uint8)


class _AuthServer:
    """``lethe serve`` (``python -m server``) with authentication on, configured from a TOML file."""

    def __init__(self, tmp_path: Path, *settings: str) -> None:
        self.port = free_port()
        self.log = tmp_path / "server.log"
        config = tmp_path / "lethe.toml"
        tokens = ", ".join(f'"{entry}"' for entry in ENTRIES)
        config.write_text(f"[auth]\nenabled = true\ntokens = [{tokens}]\n")
        args = [sys.executable, "-m", "server", "--config", str(config), "--data-dir", str(tmp_path / "data")]
        args += ["--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}", "--port", str(self.port)]
        for key, value in FAST.items():
            if key not in ("auth.enabled", "server.port"):
                args += ["--set", f"{key}={value}"]
        args += ["--set", "server.metrics_port=-1"]
        for setting in settings:
            args += ["--set", setting]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.target, self.process, self.log, timeout=120)
        except BaseException:
            stop_deployed_process(self.process)
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def uncle_server(tmp_path: Path) -> Iterator[_AuthServer]:
    server = _AuthServer(tmp_path, "model.strategy=uncle", "training.epochs=5", "model.options.burn_in=60")
    try:
        yield server
    finally:
        stop_deployed_process(server.process)


def test_tritonclient_on_the_default_strategy_with_auth(uncle_server: _AuthServer) -> None:
    low, high = digits([0, 1, 2, 3, 4]), digits([5, 6, 7, 8, 9])
    with LetheClient(uncle_server.target, token=TOKENS["admin"], retries=3, timeout=60) as lethe:
        for task, (inputs, labels) in (("low", low), ("high", high)):
            lethe.wait(lethe.learn(task, inputs, labels).id)
        version = lethe.model().version
        with triton.InferenceServerClient(uncle_server.target) as client:
            # Liveness and readiness answer without a token, like health probes.
            assert client.is_server_live() and client.is_server_ready()
            headers = _bearer("reader")
            metadata = client.get_server_metadata(headers=headers)
            assert metadata.name == "lethe" and metadata.version
            assert client.is_model_ready("low", headers=headers)
            model = client.get_model_metadata("low", headers=headers)
            assert list(model.versions) == [str(version)] and model.platform == "pytorch"
            assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 1, 8, 8])]

            for task, (inputs, labels) in (("low", low), ("high", high)):
                rows = inputs[:64]
                predicted = lethe.predict(task, rows)
                result = client.infer(task, [_infer_input(rows)], headers=headers, request_id=f"{task}-1")
                np.testing.assert_array_equal(result.as_numpy("classes"), predicted.classes)
                np.testing.assert_allclose(result.as_numpy("logits"), predicted.outputs, rtol=1e-4, atol=1e-4)
                assert np.mean(predicted.classes == labels[:64]) >= 0.8  # a real model, not plumbing
                response = result.get_response()
                assert (response.id, response.model_version) == (f"{task}-1", str(predicted.model_version))
                as_bytes = _uint8(rows)
                predicted8 = lethe.predict(task, as_bytes)
                result8 = client.infer(task, [_infer_input(as_bytes, "UINT8")], headers=headers)
                np.testing.assert_array_equal(result8.as_numpy("classes"), predicted8.classes)
                np.testing.assert_allclose(result8.as_numpy("logits"), predicted8.outputs, rtol=1e-4, atol=1e-4)

            # Authentication: no token, a token without the predict scope, a wrong token.
            rows = low[0][:4]
            for refused_headers, code in (
                ({}, "UNAUTHENTICATED"),
                (_bearer("trainer"), "PERMISSION_DENIED"),
                ({"authorization": "Bearer nope"}, "UNAUTHENTICATED"),
            ):
                with pytest.raises(InferenceServerException) as refused:
                    client.infer("low", [_infer_input(rows)], headers=refused_headers)
                assert refused.value.status() == f"StatusCode.{code}"
            with pytest.raises(InferenceServerException) as no_scope:
                client.get_model_metadata("low", headers=_bearer("trainer"))
            assert no_scope.value.status() == "StatusCode.PERMISSION_DENIED"

            # An unlearned task is never answered over this protocol.
            lethe.wait(lethe.unlearn("low", reason="right to be forgotten").id)
            assert not client.is_model_ready("low", headers=headers)
            with pytest.raises(InferenceServerException) as unlearned:
                client.infer("low", [_infer_input(rows)], headers=headers)
            assert unlearned.value.status() == "StatusCode.FAILED_PRECONDITION"
            assert "unlearned" in unlearned.value.message()
            with pytest.raises(InferenceServerException) as unknown:
                client.infer("nope", [_infer_input(rows)], headers=headers)
            assert unknown.value.status() == "StatusCode.NOT_FOUND" and "'high'" in unknown.value.message()
            # The task that stays answers from the new version, as Predict does.
            after = client.infer("high", [_infer_input(high[0][:16])], headers=headers)
            again = lethe.predict("high", high[0][:16])
            np.testing.assert_array_equal(after.as_numpy("classes"), again.classes)
            assert after.get_response().model_version == str(again.model_version) != str(version)


def test_tritonclient_on_a_class_incremental_server(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", "--set", "model.strategy=lure")
    try:
        server.wait_ready(120)
        inputs, labels = digits(list(range(10)))
        with LetheClient(server.target, retries=3, timeout=60) as lethe:
            lethe.wait(lethe.learn("mb0", inputs[::2], labels[::2]).id)
            rows = inputs[1::2][:128]
            predicted = lethe.predict(None, rows)
            assert np.mean(predicted.classes == labels[1::2][:128]) >= 0.7
        with triton.InferenceServerClient(server.target) as client:
            assert client.is_model_ready("lethe") and not client.is_model_ready("mb0")
            assert list(client.get_model_metadata("lethe").versions) == [str(predicted.model_version)]
            result = client.infer("lethe", [_infer_input(rows)])
            np.testing.assert_array_equal(result.as_numpy("classes"), predicted.classes)
            np.testing.assert_allclose(result.as_numpy("logits"), predicted.outputs, rtol=1e-4, atol=1e-4)
            assert result.get_response().model_name == "lethe"
            with pytest.raises(InferenceServerException) as other:
                client.infer("mb0", [_infer_input(rows)])
            assert other.value.status() == "StatusCode.NOT_FOUND" and "'lethe'" in other.value.message()
    finally:
        stop_deployed_process(server.process)

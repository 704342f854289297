"""The native load generator of the HA benchmark: the gRPC frame it sends, its report, and the check that
the servers, not h2load, decide whether a call succeeded (gRPC's status travels in trailers h2load ignores).

The end-to-end test drives a real ``lethe serve`` with the real h2load (``apt-get install nghttp2-client``,
which ``.ci/run`` installs) and is skipped where it is not installed.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import h2load
from benchmarks.bench_ha import PREDICT_METHOD, check_answered, predict_codes
from protos import lethe_pb2 as pb
from protos.tensors import to_tensor
from tests.support import deployed_server, digits

REPORT = """finished in 7.00s, 959.00 req/s, 2.47MB/s
requests: 5754 total, 5754 started, 5754 done, 5750 succeeded, 3 failed, 1 errored, 0 timeout
status codes: 5754 2xx, 0 3xx, 0 4xx, 0 5xx
"""


def test_a_frame_is_a_length_prefixed_uncompressed_message() -> None:
    request = pb.PredictRequest(task="t", inputs=to_tensor(digits([0, 1])[0][:3]))
    frame = h2load.grpc_frame(request)
    assert frame[0] == 0  # not compressed
    (length,) = struct.unpack(">I", frame[1:5])
    assert length == len(frame) - 5
    assert pb.PredictRequest.FromString(frame[5:]) == request


def test_the_report_is_parsed_and_a_damaged_one_refused() -> None:
    load = h2load.parse(REPORT)
    assert load == h2load.Load(requests_per_second=959.0, done=5754, failed=4)
    with pytest.raises(ValueError, match="did not report"):
        h2load.parse("connect to 127.0.0.1:1 failed")


def _loads(done: int, failed: int = 0) -> h2load.Loads:
    return h2load.Loads([h2load.Load(100.0, done, failed)], cpu_seconds=0.1)


def test_only_calls_the_servers_answered_ok_count() -> None:
    check_answered(_loads(100), Counter(OK=120, CANCELLED=8), in_flight=8)  # warm-up calls; the abandoned ones
    refusals = [
        (_loads(100), Counter(OK=100, NOT_FOUND=1)),  # an error in the trailers, HTTP 200 to h2load
        (_loads(100), Counter(OK=99)),  # fewer answers than h2load counted
        (_loads(100, failed=1), Counter(OK=100)),  # h2load saw a failure
        (_loads(100), Counter(OK=100, CANCELLED=9)),  # more cancelled than were ever in flight
    ]
    for loads, answered in refusals:
        with pytest.raises(RuntimeError, match="the servers answered"):
            check_answered(loads, answered, in_flight=8)


@pytest.mark.skipif(h2load.H2LOAD is None, reason="h2load is not installed (apt-get install nghttp2-client)")
def test_h2load_drives_a_real_server_and_its_errors_show_only_on_the_server(tmp_path: Path) -> None:
    inputs, labels = digits([0, 1])
    with deployed_server(tmp_path / "server") as server:
        server.client.wait(server.client.learn("t", inputs, labels, epochs=1).id, timeout=300)
        metrics = int(re.search(r"metrics on http://[^:]+:(\d+)/", server.log.read_text()).group(1))  # type: ignore[union-attr]
        frames = {}
        for task in ("t", "never-learned"):
            frames[task] = tmp_path / f"{task}.grpc"
            frames[task].write_bytes(h2load.grpc_frame(pb.PredictRequest(task=task, inputs=to_tensor(inputs[:8]))))

        def run(task: str) -> tuple[h2load.Loads, Counter[str]]:
            before = predict_codes(metrics)
            loads = h2load.run_together(
                [server.target], PREDICT_METHOD, frames[task], connections=1, streams=2, seconds=1, warmup=0.2
            )
            return loads, predict_codes(metrics) - before

        loads, answered = run("t")
        assert loads.loads[0].done > 20 and loads.requests_per_second > 0 and loads.cpu_seconds > 0
        check_answered(loads, answered, in_flight=2)

        loads, answered = run("never-learned")
        assert loads.loads[0].failed == 0  # HTTP 200 every time: h2load cannot tell
        assert answered["NOT_FOUND"] >= loads.loads[0].done and answered["OK"] == 0
        with pytest.raises(RuntimeError, match="NOT_FOUND"):
            check_answered(loads, answered, in_flight=2)

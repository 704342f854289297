"""``lethe jobs`` lists what ``lethe jobs ID`` and ``lethe cancel ID`` take: job ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.cli import main as lethe
from tests.support import digits, make_config, running_app


def test_the_listing_shows_ids_that_jobs_id_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_app(make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}")) as server:
        client, at = server.client, ["--server", server.target]
        first = client.wait(client.learn("a", *digits([0, 1]), epochs=1).id)
        second = client.learn("b", *digits([2, 3]), epochs=1)
        assert lethe(["jobs", *at]) == 0
        header, *rows = capsys.readouterr().out.strip().splitlines()
        assert header.split()[:2] == ["id", "kind"]
        listed = [row.split()[0] for row in rows]
        assert listed == [first.id, second.id]
        assert lethe(["jobs", listed[1], "--wait", *at]) == 0  # follows it to its end
        shown = capsys.readouterr().out
        assert shown.startswith(f"{second.id}  learn") and "succeeded" in shown
        assert lethe(["jobs", listed[0], *at]) == 0
        assert capsys.readouterr().out.startswith(f"{first.id}  learn")

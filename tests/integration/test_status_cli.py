"""`tetri status` against a real orchestrator over fake SGLang instances, and when it cannot answer."""

from __future__ import annotations

from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.launcher import free_port
from tests.adapter_helpers import orchestrator_over
from tests.conftest import ADMIN_TOKEN
from tests.fakes.harness import fakes

runner = CliRunner()


def test_status_lists_instances_and_pools(tmp_path):
    with fakes() as group:
        p, d = group.sglang("prefill"), group.sglang("decode")
        with orchestrator_over(tmp_path, (p, "sglang", "prefill", "toy-pd", "sg-prefill"),
                               (d, "sglang", "decode", "toy-pd", "sg-decode")) as (url, _):
            result = runner.invoke(app, ["status", "--url", url],
                                   env={"TETRI_ADMIN_TOKEN": ADMIN_TOKEN, "COLUMNS": "200"})
            assert result.exit_code == 0, result.output
            out = result.output
            assert "Instances" in out and "Pools" in out
            for text in ("sg-prefill", "sg-decode", "sglang", "healthy", p.url, d.url):
                assert text in out
            pool_lines = [ln for ln in out.splitlines() if ln.strip().startswith(("│ prefill", "│ decode"))]
            assert len(pool_lines) == 2

            wrong = runner.invoke(app, ["status", "--url", url], env={"TETRI_ADMIN_TOKEN": "nope", "COLUMNS": "200"})
            assert wrong.exit_code == 1
            assert "does not match" in wrong.output and "Traceback" not in wrong.output
            missing = runner.invoke(app, ["status", "--url", url], env={"TETRI_ADMIN_TOKEN": ""})
            assert missing.exit_code == 1 and "set TETRI_ADMIN_TOKEN" in missing.output


def test_status_unreachable():
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["status", "--url", url], env={"TETRI_ADMIN_TOKEN": ADMIN_TOKEN})
    assert result.exit_code == 1
    assert "no orchestrator reachable" in result.output and url in result.output

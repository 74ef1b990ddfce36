"""`tetri up` as a user runs it: SmolLM2 on one prefill and one decode worker, driven with the
`openai` SDK; then the store holds the request with both instances; Ctrl-C leaves no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from orchestrator.launcher import free_port

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tetri_up(tmp_path_factory):
    port = free_port()
    tmp = tmp_path_factory.mktemp("up")
    env = {**os.environ, "TETRI_DATABASE_URL": f"sqlite:///{tmp / 'tetri.db'}", "TETRI_ADMIN_TOKEN": "tok",
           "TETRI_LOG_DIR": str(tmp / "logs")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "up", "--port", str(port)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line and proc.poll() is not None:
            raise RuntimeError("tetri up exited:\n" + "".join(lines))
        lines.append(line)
        if "tetri ready at" in line:
            break
    else:
        proc.kill()
        raise RuntimeError("tetri up not ready:\n" + "".join(lines))
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def test_openai_sdk_streamed_and_not_then_store_has_both_instances(tetri_up):
    from openai import OpenAI

    url, _ = tetri_up
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert MODEL in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0,
    )
    text = reply.choices[0].message.content
    assert text and "Paris" in text
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 5

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces).strip() and usage is not None and usage.completion_tokens > 0

    auth = {"Authorization": "Bearer tok"}
    for rid in (reply.id, chunk.id):
        record = httpx.get(f"{url}/admin/requests/{rid}", headers=auth, timeout=10).json()
        assert record["state"] == "finished", record
        assert record["prefill_instance"] == "prefill-0" and record["decode_instance"] == "decode-1"
        assert record["first_token_at"] >= record["arrival"]


def test_sigterm_stops_everything(tetri_up):
    url, proc = tetri_up
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    worker_pids = [int(p) for p in children.stdout.split()]
    assert worker_pids
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(0.5)
    alive = [p for p in worker_pids if _alive(p)]
    assert not alive, f"orphan workers: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"

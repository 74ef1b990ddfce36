"""One model served by an SGLang pool and a TensorRT-LLM pool, split by percentage (`ab_split`):
the split follows the weights and every request row records the backend that served it."""

from __future__ import annotations

import httpx

from tests.conftest import ADMIN_TOKEN, make_settings, serve_app
from tests.fakes.harness import fakes, register

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODEL = "toy-ab"


def test_ab_split_by_percentage_records_backend(tmp_path):
    from orchestrator.app import create_app

    with fakes() as group:
        sg = group.sglang(model_path=MODEL)
        trt = group.trtllm(model=MODEL)
        settings = make_settings(tmp_path, [], ab_split={"sglang": 75, "tensorrt-llm": 25})
        app = create_app(settings)
        app.state.tetri.placement.rng.seed(7)
        with serve_app(app) as url:
            register(url, ADMIN_TOKEN, sg.url, "sglang", "colocated", MODEL, "sg-colo")
            register(url, ADMIN_TOKEN, trt.url, "tensorrt-llm", "colocated", MODEL, "trt-colo")
            served: dict[str, int] = {"sglang": 0, "tensorrt-llm": 0}
            for i in range(80):
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 3}
                resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
                assert resp.status_code == 200, resp.text
                record = httpx.get(f"{url}/admin/requests/{resp.json()['id']}", headers=AUTH, timeout=10).json()
                assert record["prefill_instance"] == {"sglang": "sg-colo", "tensorrt-llm": "trt-colo"}[
                    record["backend"]]
                served[record["backend"]] += 1
    # 75/25 of 80 is 60/20; a binomial 3-sigma band is about ±12.
    assert 48 <= served["sglang"] <= 72, served
    assert served["sglang"] + served["tensorrt-llm"] == 80

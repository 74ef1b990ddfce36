"""The published OpenAPI document says what the app does.

schemathesis generates requests from /openapi.json (25 per operation) against an orchestrator over a
fake SGLang server and checks every answer against the document: no server error; every status,
header, content type, JSON body and SSE event as documented; and a request body the document
forbids is refused. Plus the document's own promises: 400 (not 422) in the OpenAI error shape, SSE
on the completion routes, and a 405 that names the allowed methods."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from tests.adapter_helpers import orchestrator_over
from tests.conftest import ADMIN_TOKEN
from tests.fakes.harness import fakes

MODEL = "toy-sglang-colo"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EXAMPLES = 25
# Fixed examples in the suite (no flakes); TETRI_SCHEMATHESIS_EXPLORE=1 draws new ones each run.
DERANDOMIZE = not os.environ.get("TETRI_SCHEMATHESIS_EXPLORE")
# Operations whose run is known to fail, and why: a bug outside this test's files, to fix there.
KNOWN_FAILURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fakes() as group:
        engine = group.sglang(None)
        with orchestrator_over(tmp_path_factory.mktemp("schemathesis"),
                               (engine, "sglang", "colocated", MODEL, "sg-colo")) as (url, _):
            yield url


def test_the_app_does_what_its_openapi_document_says(served: str) -> None:
    config = schemathesis.Config.from_dict({"generation": {"max-examples": EXAMPLES}})
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json", config=config)
    failures: dict[str, str] = {}
    ran = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label in KNOWN_FAILURES:
            continue
        ran.add(operation.label)
        # Negative cases for request bodies only: a query parameter is a string on the wire, so a
        # "wrong type" there (kind=5 for a string) is no violation the app could see.
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.get_request_payload_content_types():
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            try:
                _run(operation, mode)
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - one report for every operation
                failures[f"{operation.label} ({mode.value})"] = str(exc)
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health",
            "GET /admin/instances", "POST /admin/instances"} <= ran
    assert not failures, "\n\n".join(f"{label}:\n{why}" for label, why in failures.items())


def _run(operation: Any, mode: schemathesis.GenerationMode) -> None:
    positive = mode == schemathesis.GenerationMode.POSITIVE

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def check(case: Any, data: st.DataObject) -> None:
        body = case.body
        if positive and case.path.startswith("/v1/") and isinstance(body, dict) and data.draw(st.booleans()):
            # Random model names all get the 404: half the valid requests name the served model, so
            # the whole path (tokenizer, placement, the fake engine, JSON or SSE) runs; short outputs.
            body["model"] = MODEL
            for key in ("max_tokens", "max_completion_tokens"):
                if isinstance(body.get(key), int | float) and not isinstance(body[key], bool):
                    body[key] = min(body[key], 16)  # 5562.0 is an integer too
        # Not checked: that every schema-valid request succeeds. Some limits depend on the served
        # model (its vocabulary for token ids, its context length), so the document cannot state them.
        case.call_and_validate(headers=AUTH if case.path.startswith("/admin/") else None,
                               excluded_checks=[positive_data_acceptance])

    check()


# ---- what the document says ---------------------------------------------------------------------
def test_errors_are_documented_as_400_in_the_openai_shape(served: str) -> None:
    doc = httpx.get(f"{served}/openapi.json", timeout=10).json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error = doc["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            assert "422" not in op["responses"], (method, path)
            if op.get("requestBody") or op.get("parameters"):
                ref = op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorResponse", (method, path)
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert "Retry-After" in responses["503"]["headers"]
        assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"])
    admin = doc["paths"]["/admin/instances"]["get"]
    assert admin["security"] == [{"bearerAuth": []}] and "401" in admin["responses"]


def test_validation_error_is_a_400_in_the_openai_shape(served: str) -> None:
    resp = httpx.post(f"{served}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": "many"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "max_tokens" and resp.json()["error"]["code"] == "invalid_value"


@pytest.mark.parametrize("method,path,allowed", [
    ("GET", "/v1/completions", "POST"), ("DELETE", "/v1/models", "GET"), ("PUT", "/health", "GET"),
])
def test_a_wrong_method_is_a_405_naming_the_allowed_ones(served: str, method: str, path: str, allowed: str) -> None:
    resp = httpx.request(method, f"{served}{path}", timeout=10)
    assert resp.status_code == 405 and resp.headers["allow"] == allowed
    assert resp.json()["error"]["type"] == "invalid_request_error"

"""Helpers every HTTP adapter shares (the transport itself is backends/http.py): the in-flight
ledger that fills a LoadReport with our heavy/light classes, error tagging, the in-place-flip
refusal, and Prometheus text parsing."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from backends.base import BackendError, GenRequest, LoadReport


class RestartRequired(BackendError):
    """The engine cannot take the new role in place: it is drained, restart it in the new role."""

    restart_required = True

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message, status=status, retryable=False)


def tag(exc: BackendError, instance_id: str) -> BackendError:
    """Name the instance that failed on the error (`exc.instance_id`), so a control plane running
    a two-instance handoff knows which side to avoid on its retry."""
    if getattr(exc, "instance_id", None) is None:
        exc.instance_id = instance_id  # type: ignore[attr-defined]
    return exc


def host_of(url: str) -> str:
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or "127.0.0.1"
    return host


@dataclass
class _Flight:
    prompt_tokens: int
    predicted_lo: int
    heavy: bool
    max_tokens: int
    produced: int = 0
    phase: str = "queued"


@dataclass
class InflightLedger:
    """What this adapter has in flight on its instance. Engines do not know our heavy/light
    classes or predicted lengths, so the adapter reports them in its LoadReport from here."""

    heavy_threshold: int = 128
    flights: dict[str, _Flight] = field(default_factory=dict)

    def start(self, request: GenRequest) -> None:
        lo = request.predicted_output_lo or 0
        heavy = request.heavy_decode if request.heavy_decode is not None else lo > self.heavy_threshold
        self.flights[request.request_id] = _Flight(
            prompt_tokens=len(request.prompt_ids),
            predicted_lo=lo,
            heavy=bool(heavy),
            max_tokens=request.sampling.max_tokens,
        )

    def progress(self, request_id: str, tokens: int, phase: str = "decode") -> None:
        flight = self.flights.get(request_id)
        if flight is not None:
            flight.produced += tokens
            flight.phase = phase

    def finish(self, request_id: str) -> None:
        self.flights.pop(request_id, None)

    def __len__(self) -> int:
        return len(self.flights)

    def fill(self, report: LoadReport) -> LoadReport:
        decoding = list(self.flights.values())
        report.heavy_decodes = sum(1 for f in decoding if f.heavy)
        report.light_decodes = sum(1 for f in decoding if not f.heavy)
        report.decode_remaining = [max(0, f.predicted_lo - f.produced) for f in decoding]
        prompt_tokens = sum(f.prompt_tokens for f in decoding if f.phase in ("queued", "prefill"))
        report.running_prompt_tokens = max(0, prompt_tokens - report.queued_prompt_tokens)
        return report


def parse_prometheus(text: str, prefixes: Iterable[str]) -> dict[str, float]:
    """Sum each gauge over its label sets: {"num_running_reqs": 3.0, ...} (prefix stripped)."""
    out: dict[str, float] = {}
    pattern = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN|[-+]?Inf)")
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = pattern.match(line)
        if not match:
            continue
        name = match.group(1)
        for prefix in prefixes:
            if name.startswith(prefix):
                key = name[len(prefix) :]
                try:
                    value = float(match.group(3))
                except ValueError:
                    continue
                out[key] = out.get(key, 0.0) + value
                break
    return out

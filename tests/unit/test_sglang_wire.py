"""backends/sglang/wire.py's ChunkState.feed_batch: a network read's chunks give the same output as
feeding them one by one, and a cumulative burst is parsed once."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backends.sglang import wire
from backends.sglang.wire import ChunkState


def _chunk(ids: list[int], text: str, completion: int, finish: Any = None) -> bytes:
    meta = {"completion_tokens": completion, "finish_reason": finish, "cached_tokens": 3}
    return json.dumps({"text": text, "output_ids": ids, "meta_info": meta}).encode()


def _cumulative(n: int, finish_at: int | None = None) -> list[bytes]:
    out = []
    for k in range(1, n + 1):
        finish = {"type": "length", "length": k} if k == finish_at else None
        out.append(_chunk(list(range(100, 100 + k)), "".join(f" t{i}" for i in range(k)), k, finish))
    return out


def _incremental(n: int) -> list[bytes]:
    return [_chunk([100 + k], f" t{k}", k + 1, {"type": "length"} if k == n - 1 else None) for k in range(n)]


def _one_by_one(payloads: list[bytes]) -> ChunkState:
    state = ChunkState()
    for p in payloads:
        state.feed(json.loads(p))
        if state.finish is not None:
            break
    return state


def _batched(payloads: list[bytes], sizes: list[int]) -> ChunkState:
    state = ChunkState()
    i = 0
    for size in sizes:
        if state.finish is not None:
            break
        state.feed_batch(payloads[i : i + size])
        i += size
    return state


def _same(a: ChunkState, b: ChunkState) -> None:
    assert (a.ids, a.text, a.finish, a.error) == (b.ids, b.text, b.finish, b.error)


@pytest.mark.parametrize("sizes", [[1] * 8, [1, 7], [2, 3, 3], [8], [1, 1, 6]])
@pytest.mark.parametrize("make", [_cumulative, _incremental])
def test_a_batch_gives_what_one_by_one_gives(make, sizes):
    payloads = make(8) if make is _incremental else make(8, finish_at=8)
    _same(_batched(payloads, sizes), _one_by_one(payloads))
    assert _batched(payloads, sizes).ids == list(range(100, 108))


def test_a_cumulative_burst_is_parsed_once(monkeypatch):
    payloads = _cumulative(9, finish_at=9)
    calls = []
    real = wire.parse_sse_payload
    monkeypatch.setattr(wire, "parse_sse_payload", lambda p: calls.append(p) or real(p))
    state = ChunkState()
    state.feed_batch(payloads[:1])
    state.feed_batch(payloads[1:])
    assert len(calls) == 2 and state.finish == "length" and len(state.ids) == 9


def test_an_error_last_in_a_burst_is_seen_after_the_tokens_before_it():
    err = json.dumps({"error": {"message": "boom", "code": 503}}).encode()
    payloads = _cumulative(4)
    state = ChunkState()
    state.feed_batch(payloads[:1])
    state.feed_batch([*payloads[1:], err])
    assert state.ids == list(range(100, 104)) and state.finish == "error" and state.status == 503


def test_nothing_after_a_finish_in_a_burst_counts():
    payloads = _cumulative(3, finish_at=3) + [_chunk(list(range(100, 105)), " t0 t1 t2 t3 t4", 5)]
    state = ChunkState()
    state.feed_batch(payloads[:1])
    state.feed_batch(payloads[1:])
    assert state.finish == "length" and state.ids == list(range(100, 103))

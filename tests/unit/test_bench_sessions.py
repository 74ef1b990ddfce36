"""Session workloads (bench/sessions.py): their shapes, the oracle hit rate on hand-made examples,
and the closed-loop runner (bench/sessions_live.py) against an in-process server speaking the
OpenAI streaming wire format, and (slow) against a real `tetri up` deployment of sim workers."""

from __future__ import annotations

import asyncio
import json
import os
import random

import httpx
import pytest

from backends.prefix import BLOCK_TOKENS
from bench.sessions import (
    OracleCache,
    SessionRequest,
    SessionWorkload,
    build_session_workload,
    offline_oracle,
    parse_options,
    prefix_summary,
)
from bench.sessions_live import run_sessions_async


class WordTok:
    """A word-level tokenizer with a ChatML-like template: [1, role, words..., 2] per message, then
    [1, 5] (the generation prompt). Prefix-stable as the real template is."""

    ROLES = {"system": 3, "user": 4, "assistant": 5}

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.words: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = 100 + len(self.vocab)
                self.words[self.vocab[w]] = w
            out.append(self.vocab[w])
        return out

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids if i in self.words)

    def chat(self, messages) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += [1, self.ROLES[m["role"]], *self.encode(m["content"]), 2]
        return ids + [1, 5]


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


DIALOGUES = [
    ("a", [(words("q", 30), words("ans", 50)), (words("r", 10), words("bns", 8)), (words("s", 5), words("c", 5))]),
    ("b", [(words("x", 20), words("y", 3))]),  # one exchange: too short for min_turns 2
    ("c", [(words("u", 12), words("v", 40)), (words("w", 500), words("z", 9))]),  # turn 2 passes ctx
    ("d", [(words("k", 8), words("m", 7)), (words("n", 9), words("o", 6))]),
]


def test_sessions_carry_history_dependencies_and_capped_outputs():
    wl = build_session_workload("sessions:turns=3:think=2:max_output=20:ctx=400", 2, seed=1, tokenizer=WordTok(),
                                dialogues=DIALOGUES)  # fmt: skip
    by = {tuple(r.user.split()[:1]): r for r in wl.requests}
    assert len(wl.sessions()) == 2 and len(wl.requests) == 5  # "a" (3 turns) and "d" (2); b, c skipped
    a = sorted((r for r in wl.requests if r.user.startswith("q") or r.user.startswith(("r", "s"))),
               key=lambda r: r.turn)  # fmt: skip
    assert [r.turn for r in a] == [0, 1, 2] and a[0].after is None and a[1].after == a[0].id == f"{a[0].session}-t0"
    assert a[0].think_s == 0 and a[1].think_s > 0
    assert [r.output_tokens for r in a] == [20, 8, 5]  # the dataset's answers, capped at max_output
    assert a[0].prompt_tokens == 1 + 1 + 30 + 1 + 2  # [1, user, 30 words, 2] + the generation prompt [1, 5]
    # turn k's prompt starts with turn k-1's prompt and (stand-in) answer, in full
    for prev, cur in zip(a, a[1:], strict=False):
        assert cur.shared_tokens == prev.prompt_tokens + prev.output_tokens
        n = cur.shared_tokens // BLOCK_TOKENS
        assert cur.blocks[:n] == prev.blocks[:n]
        assert len(cur.blocks) == (cur.prompt_tokens + cur.output_tokens) // BLOCK_TOKENS
    assert by[("k0",)].cls == "first-turn" and by[("n0",)].cls == "later-turn"


def test_retiming_moves_session_starts_only():
    wl = build_session_workload("sessions:turns=3:max_output=20:ctx=400", 2, tokenizer=WordTok(), dialogues=DIALOGUES)
    timed = wl.with_arrivals(0.5, seed=3)
    assert isinstance(timed, SessionWorkload) and timed.meta["rate_unit"] == "sessions/s"
    for turns in timed.sessions():
        assert len({r.arrival for r in turns}) == 1  # later turns follow their answers, not a clock
    assert sorted({r.arrival for r in timed.requests}) == sorted(t[0].arrival for t in timed.sessions())
    with pytest.raises(ValueError, match="name's options"):
        timed.scaled(0.5)


def test_shared_prefix_groups_share_their_system_prompt_exactly():
    tok = WordTok()
    wl = build_session_workload("shared-prefix:groups=3:per_group=4:system=40:question=6:output=5", 0, seed=2,
                                tokenizer=tok)  # fmt: skip
    assert len(wl.requests) == 12 and len(wl.sessions()) == 12
    groups: dict[str, list[SessionRequest]] = {}
    for r in wl.requests:
        assert r.output_tokens == 5 and r.after is None
        assert len(tok.encode(r.user)) == 6 and len(tok.encode(r.system or "")) == 40
        groups.setdefault(r.system or "", []).append(r)
    assert len(groups) == 3
    for rs in groups.values():
        assert {r.shared_tokens for r in rs} == {2 + 40 + 2}  # [1, system, 40 words, 2]
        assert len({r.blocks[:2] for r in rs}) == 1  # the 44 shared tokens: two full blocks
    # oracle: each group's first request misses; the others reuse 2 blocks (32 tokens) of 54
    assert offline_oracle(wl).hit_tokens == 3 * 3 * 32
    assert wl.stats()["oracle_hit_rate"] == pytest.approx(9 * 32 / (12 * 54))
    in_order = build_session_workload("shared-prefix:groups=2:per_group=2:system=8:shuffle=0", 0, tokenizer=tok)
    assert [r.session.split("-")[1] for r in in_order.requests] == ["g0q0", "g0q1", "g1q0", "g1q1"]


def test_options_are_checked():
    assert parse_options("sessions:turns=3", {"turns": 6.0, "think": 1.0}) == {"turns": 3.0, "think": 1.0}
    for bad in ("sessions:turn=3", "sessions:turns", "sessions:turns=x", "sessions:turns=-1"):
        with pytest.raises(ValueError):
            parse_options(bad, {"turns": 6.0})
    with pytest.raises(ValueError, match="unknown session workload"):
        build_session_workload("sessionz", 1, tokenizer=WordTok(), dialogues=DIALOGUES)
    with pytest.raises(ValueError, match="only 3 of 5 sessions"):
        build_session_workload("sessions", 5, tokenizer=WordTok(), dialogues=DIALOGUES)


def test_the_oracle_on_a_hand_made_example():
    oracle = OracleCache()
    p1 = list(range(40))  # 2 full blocks + 8
    assert oracle.reuse(p1) == 0
    answer = list(range(1000, 1010))  # prompt + answer = 50 tokens; KV of 49: 3 full blocks
    oracle.answered(p1, answer)
    p2 = p1 + answer + list(range(2000, 2007))  # 57 tokens, its first 48 cached
    assert oracle.reuse(p2) == 48
    assert oracle.reuse(list(range(32)) + [7] * 20) == 32  # diverges in block 3
    assert oracle.reuse(list(range(32))) == 16  # fully cached: all but the last token's block
    assert oracle.reuse([9] + list(range(1, 40))) == 0  # only a leading run counts
    assert oracle.query_tokens == 40 + 57 + 52 + 32 + 40 and oracle.hit_tokens == 96
    # an answer whose last token ends a block: that block's KV was never computed
    o2 = OracleCache()
    o2.reuse(list(range(16)))
    o2.answered(list(range(16)), list(range(100, 116)))
    assert o2.reuse(list(range(16)) + list(range(100, 116)) + [5]) == 16


def test_prefix_summary_ratios():
    recs = [
        {"error": None, "prompt_tokens": 100, "cached_tokens": 48, "oracle_tokens": 64, "client_prompt_tokens": 100},
        {"error": None, "prompt_tokens": 100, "cached_tokens": 0, "oracle_tokens": 0, "client_prompt_tokens": 99},
        {"error": "x", "prompt_tokens": 100, "cached_tokens": 100, "oracle_tokens": 100},
    ]
    s = prefix_summary(recs, {"hit_tokens": 30, "query_tokens": 200})
    assert s["cache_hit_rate"] == 0.24 and s["oracle_hit_rate"] == 0.32 and s["hit_of_oracle"] == 0.75
    assert s["engine_hit_rate"] == 0.15 and s["prompt_token_mismatches"] == 1


def fake_server(tok: WordTok, seen: list[dict], cached_by_oracle: OracleCache, fail_id: str | None = None):
    """An OpenAI chat endpoint (streaming, usage with cached_tokens): one instance with an unbounded
    cache (the oracle), answering `max_tokens` words."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "object": "model"}]})
        body = json.loads(request.content)
        seen.append(body)
        if fail_id and body["messages"][-1]["content"].startswith(fail_id):
            return httpx.Response(503, headers={"Retry-After": "1"}, json={"error": {"message": "busy"}})
        ids = tok.chat(body["messages"])
        cached = cached_by_oracle.reuse(ids)
        n = body["max_tokens"]
        answer = [f"w{len(seen)}x{i}" for i in range(n)]
        cached_by_oracle.answered(ids, tok.encode(" ".join(answer)))
        lines = [{"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}]
        lines += [
            {"choices": [{"index": 0, "delta": {"content": (" " if i else "") + w}, "finish_reason": None}]}
            for i, w in enumerate(answer)
        ]
        lines.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n,
                 "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
        lines.append({"choices": [], "usage": usage})
        text = "".join(f"data: {json.dumps(x)}\n\n" for x in lines) + "data: [DONE]\n\n"
        return httpx.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handle)


def test_closed_loop_runner_sends_each_turn_after_the_answer_with_the_models_history():
    tok = WordTok()
    wl = build_session_workload("sessions:turns=3:think=0.01:max_output=6:ctx=400", 2, tokenizer=tok,
                                dialogues=DIALOGUES).with_arrivals(100.0, seed=1)  # fmt: skip
    seen: list[dict] = []
    server_cache = OracleCache()
    records, _t0, model = asyncio.run(
        run_sessions_async("http://fake", wl, tok, transport=fake_server(tok, seen, server_cache))
    )
    assert model == "m" and len(records) == 5 and all(r.error is None for r in records)
    for body in seen:
        assert body["stream"] and body["ignore_eos"] and body["max_tokens"] <= 6
        for m in body["messages"]:
            if m["role"] == "assistant":  # the history holds what the server answered, not the dataset's
                assert m["content"].startswith("w")
    by = {(r.session, r.turn): r for r in records}
    for (s, k), r in by.items():
        assert r.client_prompt_tokens == r.prompt_tokens  # the server's count (usage)
        if k:
            prev = by[(s, k - 1)]
            assert r.sent >= prev.end  # closed loop: after the previous answer (+ think time)
            assert r.cached_tokens == r.oracle_tokens > 0
    summ = prefix_summary([r.to_dict() for r in records])
    assert summ["hit_of_oracle"] == 1.0 and 0 < summ["oracle_hit_rate"] < 1


def test_a_failed_turn_cuts_its_session():
    tok = WordTok()
    wl = build_session_workload("sessions:turns=3:think=0:max_output=6:ctx=400", 2, tokenizer=tok,
                                dialogues=DIALOGUES)  # fmt: skip
    seen: list[dict] = []
    records, *_ = asyncio.run(
        run_sessions_async("http://fake", wl, tok, transport=fake_server(tok, seen, OracleCache(), fail_id="r0"))
    )
    errs = {(r.turn, (r.error or "")[:12]) for r in records if r.error}
    assert errs == {(1, 'HTTP 503: {"'), (2, "session cut:")}
    assert len(records) == 5 and len(seen) == 4  # the cut turn was never sent


@pytest.mark.slow
def test_sessions_against_a_live_deployment_hit_the_cache(tmp_path, monkeypatch):
    """`tetri up` with two sim workers (the engine's prefix cache over the cpu-smollm2 timing
    model), the real tokenizer and template: later turns are served from cache, as the oracle says."""
    from bench.live import BENCH_ADMIN_TOKEN, Deployment, _free_port
    from bench.sessions import default_tokenizer
    from bench.sessions_live import run_sessions

    try:
        tok = default_tokenizer()
    except Exception as exc:  # no tokenizer cached and no network
        pytest.skip(f"default tokenizer unavailable: {exc}")
    monkeypatch.setenv("TETRI_LOG_DIR", str(tmp_path / "logs"))
    rng = random.Random(0)
    text = [" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "and"]) for _ in range(60)) for _ in range(6)]
    dialogues = [(f"d{i}", [(text[i], text[i + 1]), (text[i + 2], text[i + 3])]) for i in range(2)]
    wl = build_session_workload("sessions:turns=2:think=0.05:max_output=12", 2, tokenizer=tok, dialogues=dialogues)
    env = {"TETRI_MODE": "colocated", "TETRI_ADMIN_TOKEN": BENCH_ADMIN_TOKEN}
    dep = Deployment(["--colocated", "2", "--prefill", "0", "--decode", "0", "--backend", "sim"], env, _free_port(),
                     tmp_path / "up.log")  # fmt: skip
    try:
        dep.wait_ready(180)
        res = run_sessions(dep.url, wl.with_arrivals(2.0, 1), tok, instances=2, admin_token=BENCH_ADMIN_TOKEN)
    finally:
        dep.stop()
    s = res["summary"]
    assert s["completed"] == 4 and s["errors"] == 0, res["requests"]
    assert s["prompt_token_mismatches"] == 0
    assert s["oracle_hit_rate"] > 0.3 and s["cache_hit_rate"] > 0, s
    # Later turns find their history (the first turns' shared system prompt is not worth piling both
    # sessions onto one instance: prefix_running_weight spreads them).
    later = [r for r in res["requests"] if r["turn"] > 0]
    assert sum(r["cached_tokens"] for r in later) >= 0.8 * sum(r["oracle_tokens"] for r in later) > 0, later
    assert s["engine_query_tokens"] > 0
    assert os.path.exists(tmp_path / "up.log")

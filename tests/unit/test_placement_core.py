"""The placement core (orchestrator/policies/core.py) and its parts, over hand-made views."""

from __future__ import annotations

import random

import pytest

from backends.prefix import block_hashes, reusable_tokens
from orchestrator.policies.core import DISAGGREGATED, PlacementCore, RouteChoice
from orchestrator.policies.global_scheduler import make_global_scheduler
from orchestrator.policies.hosts import has_room, pick_host
from orchestrator.policies.ledger import KVLedger
from orchestrator.policies.prefill_queue import make_prefill_queue
from orchestrator.policies.prefix import PrefixIndex
from orchestrator.policies.types import InstanceView, RequestView


def view(iid: str, role: str = "decode", total: int = 10_000, free: int = 10_000, **kw) -> InstanceView:
    return InstanceView(id=iid, role=role, total_kv_tokens=total, free_kv_tokens=free, **kw)  # type: ignore[arg-type]


def req(prompt: int = 100, bucket: int | None = None, rid: str = "r", max_tokens: int = 1000) -> RequestView:
    return RequestView(id=rid, arrival=0.0, prompt_tokens=prompt, max_tokens=max_tokens, predicted_bucket=bucket)


def core(**kw) -> PlacementCore:
    return PlacementCore(**{"colocate_backlog_tokens": 1200, **kw})


P = [view("p0", "prefill"), view("p1", "prefill")]
D = [view("d0"), view("d1", free=5000)]


def test_route_modes():
    assert core(mode="disaggregated").route(req(), [], False, D, False) == DISAGGREGATED
    # No P/D pair: co-located, on the colocated pool if there is one, else on the best decode host.
    assert core().route(req(), [], True, D, True) == RouteChoice("colocated", reason="mode")
    assert core().route(req(), [], True, D, False) == RouteChoice("colocated", "decode", "d0", "mode")
    assert core(colocate_on_decode=False).route(req(), [], True, D, False) == RouteChoice("colocated", reason="mode")
    assert core(mode="colocated").route(req(), P, True, D, False).host == "d0"
    assert core().route(req(), P, True, D, False) == DISAGGREGATED


def test_hphd_needs_a_heavy_prompt_and_a_heavy_prediction_and_admission():
    heavy = req(prompt=600, bucket=2)  # predicted >= 400 tokens > 128: heavy decode
    assert core().route(heavy, P, True, D, False) == RouteChoice("colocated", "decode", "d0", "hphd")
    assert core().route(heavy, P, True, D, True) == RouteChoice("colocated", reason="hphd")
    assert core().route(req(prompt=600, bucket=0), P, True, D, False) == DISAGGREGATED  # light decode
    assert core().route(req(prompt=400, bucket=2), P, True, D, False) == DISAGGREGATED  # light prefill
    assert core().route(req(prompt=600), P, True, D, False) == DISAGGREGATED  # no prediction yet
    assert core(colocate_heavy_heavy=False).route(heavy, P, True, D, False) == DISAGGREGATED
    full = [view("d0", free=500), view("d1", free=900)]  # admission refuses 600 + 400
    assert core().route(heavy, P, True, full, False) == DISAGGREGATED


def test_backlog_fallback_counts_tokens_and_needs_a_host_with_room():
    backlogged = [view("p0", "prefill", queued_prompt_tokens=1000, running_prompt_tokens=300),
                  view("p1", "prefill", queued_prompt_tokens=2000)]  # fmt: skip
    assert core().route(req(), backlogged, True, D, False) == RouteChoice("colocated", "decode", "d0", "backlog")
    assert core(colocate_backlog_tokens=1300).route(req(), backlogged, True, D, False) == DISAGGREGATED
    assert core(colocate_backlog_tokens=0).route(req(), backlogged, True, D, False) == DISAGGREGATED
    busy = [view("d0", queued=1), view("d1", free=2000)]  # d0 has a queue, d1 lacks 20% + the prompt
    assert core().route(req(), backlogged, True, busy, False) == DISAGGREGATED


def test_room_test_uses_the_working_set_estimate_and_reservations():
    assert has_room(view("d", total=1000, free=300), req(prompt=100))
    assert not has_room(view("d", total=1000, free=300, reserved_kv_tokens=1), req(prompt=100))
    assert not has_room(view("d", total=1000, free=300), req(prompt=100, bucket=1))  # + 200 predicted
    assert not has_room(view("d", total=1000, free=1000, queued=1), req())
    assert not has_room(view("d", total=0, free=0), req(prompt=0))


def test_host_pickers():
    hosts = [view("a", queued_prompt_tokens=500), view("b", running=3, queued=1), view("c", running=1)]
    assert pick_host(hosts, "prefill_load") == "c"  # b and c have no prompt work; c fewer requests
    assert pick_host(hosts, "outstanding") == "a"
    cached = [view("a", queued_prompt_tokens=500, cached_prompt_tokens=600), view("c", running=1)]
    assert pick_host(cached, "prefill_load") == "a"  # its cache saves more than its queue costs
    assert pick_host([], "prefill_load") is None
    with pytest.raises(ValueError):
        core(colocate_pick="nope")


def test_release_rule():
    c = core(prefill_engine_backlog=2)
    assert c.may_release("prefill", 0, 0, 512)
    assert c.may_release("prefill", 3, 400, 512) and not c.may_release("prefill", 3, 512, 512)
    assert c.may_release("prefill", 1, 9999, 0) and not c.may_release("prefill", 2, 0, 0)  # no chunk: count
    assert c.may_release("decode", 7, 0, 0) and not c.may_release("decode", 8, 0, 0)


def test_steal_takes_the_busiest_peers_next_prompt_unless_avoided_or_refused():
    queues = {pid: make_prefill_queue("fcfs") for pid in ("a", "b")}
    queues["a"].push(req(100, rid="x"), 0.0)
    queues["b"].push(req(300, rid="y"), 0.0)
    queues["b"].push(req(300, rid="z"), 0.0)
    thief = view("t", "prefill")
    never = lambda rid: frozenset()  # noqa: E731
    victim, got = core().steal(thief, queues, never)
    assert (victim, got.id) == ("b", "y")
    assert core().steal(thief, queues, lambda rid: frozenset({"t"})) is None
    assert core(late_binding=None).steal(thief, {}, never) is None
    from orchestrator.policies.late_binding import make_late_binding

    assert core(late_binding=make_late_binding("none")).steal(thief, queues, never) is None
    full = view("t", "decode", total=1000, free=100)
    assert core().steal(full, queues, never) is None  # a decode thief must admit it


def test_cache_aware_steal_leaves_a_prompt_with_the_instance_holding_its_prefix():
    """An idle peer takes a session's next turn only if the cache-aware scheduler would place it
    there: not when the victim holds most of its prompt and little waits there, yes when the queue
    ahead of it at the victim outweighs the cache hit."""
    turn = RequestView(id="turn", arrival=0.0, prompt_tokens=400, max_tokens=16, prefix_hashes=(1, 2, 3))
    queues = {"holder": make_prefill_queue("fcfs")}
    queues["holder"].push(turn, 0.0)
    thief = view("idle", "colocated", chunk_tokens=256)
    never = lambda rid: frozenset()  # noqa: E731
    prefix_core = core(global_scheduler=make_global_scheduler("prefix_aware"))

    def pair(holder_load: int):
        holder = view("holder", "colocated", chunk_tokens=256, cached_prompt_tokens=352,
                      queued_prompt_tokens=holder_load)
        return lambda r, victim: (holder, view("idle", "colocated", chunk_tokens=256, cached_prompt_tokens=16))

    assert prefix_core.steal(thief, queues, never, pair(400)) is None  # its history is there: it stays
    victim, got = prefix_core.steal(thief, queues, never, pair(4000))  # a deep queue there: it moves
    assert (victim, got.id) == ("holder", "turn")
    # A cache-blind scheduler steals as before, whatever the caches hold.
    assert core().steal(thief, queues, never, pair(400)) == ("holder", turn)
    # A draining holder (not usable) keeps nothing: its prompt goes to the idle peer.
    draining = view("holder", "colocated", chunk_tokens=256, cached_prompt_tokens=352, accepting=False)
    idle = view("idle", "colocated", chunk_tokens=256)
    assert prefix_core.steal(thief, queues, never, lambda r, v: (draining, idle)) == ("holder", turn)
    # Decode hosts (prompts run co-located on decode instances) are not the global scheduler's to keep.
    decode_thief = view("idle", "decode")
    decode_pair = lambda r, v: (view("holder", "decode", cached_prompt_tokens=352), view("idle", "decode"))  # noqa: E731
    assert prefix_core.steal(decode_thief, queues, never, decode_pair) == ("holder", turn)


def test_pick_decode_is_the_dispatchers_pick_gated_by_admission():
    c = PlacementCore()
    rng = random.Random(0)
    assert c.pick_decode(req(), [view("d0"), view("d1")], rng) in ("d0", "d1")
    assert c.pick_decode(req(prompt=500), [view("d0", free=100)], rng) is None


def test_kv_ledger_holds_move_and_release_once():
    a, b = KVLedger(), KVLedger()
    with a.hold("r1", 100) as h1:
        h2 = a.hold("r2", 50)
        assert a.total == 150
        h2.move(b)
        assert (a.total, b.total) == (100, 50)
        h2.release()
        h2.release()
        assert b.total == 0 and len(b) == 0
    assert a.total == 0 and h1.released
    h1.move(b)  # released: nothing moves
    assert b.total == 0


def test_prefix_index_and_the_cache_aware_schedulers():
    idx = PrefixIndex(ttl_s=10.0, max_blocks=4)
    hashes = block_hashes(list(range(64)), "m")  # 4 full blocks
    idx.routed("a", hashes[:3], now=0.0)
    assert idx.match("a", hashes, now=1.0) == 3 and idx.match("b", hashes, now=1.0) == 0
    assert idx.match("a", hashes, now=11.0) == 0  # approximate entries expire
    idx.stored("b", hashes)
    other = block_hashes(list(range(100, 164)), "m")
    idx.routed("b", other, now=0.0)  # precise: a guess bridges only until the events can tell
    assert idx.match("b", other, now=1.0) == 4 and idx.match("b", other, now=31.0) == 0
    idx.routed("b", hashes, now=0.0)  # never downgrades what the engine reported
    assert idx.match("b", hashes, now=99.0) == 4
    idx.removed("b", hashes[1:2])
    assert idx.match("b", hashes, now=0.0) == 1  # only a consecutive prefix counts
    assert block_hashes(list(range(64)), "other")[0] != hashes[0]  # never shared across models
    assert reusable_tokens(64, 4) == 48 and reusable_tokens(65, 4) == 64
    # A reset (the engine's whole cache) replaces what it reported, not the guesses still in flight.
    idx.routed("b", other, now=0.0)
    idx.reset("b", hashes[:2])
    assert idx.match("b", hashes, now=1.0) == 2 and idx.match("b", other, now=1.0) == 4
    assert idx.match("b", other, now=31.0) == 0

    r = req(prompt=1000)
    loaded = [view("a", "prefill", queued_prompt_tokens=300, cached_prompt_tokens=900), view("b", "prefill")]
    assert make_global_scheduler("least_loaded").pick(loaded, r) == "b"
    assert make_global_scheduler("prefix_aware").pick(loaded, r) == "a"  # 300 + 100 < 1000
    assert make_global_scheduler("prefix_aware", cache_weight=0.0).pick(loaded, r) == "b"
    sg = make_global_scheduler("sglang_cache_aware")
    assert sg.pick(loaded, r) == "a"  # 90% match > 30%
    imbalanced = [view("a", "prefill", running=100, cached_prompt_tokens=900), view("b", "prefill", running=1)]
    assert sg.pick(imbalanced, r) == "b"
    weak = [view("a", "prefill", running=2, cached_prompt_tokens=100), view("b", "prefill", running=1)]
    assert sg.pick(weak, r) == "b"


def test_prefix_aware_weighs_the_decode_working_set_against_a_small_hit():
    """A shared system prompt (32 cached tokens) must not pull every new session onto the instances
    that hold it: 16 tokens per running request outweigh it (counted 4x: 128 tokens) from 8 more
    running; a long cached conversation still wins against many more running requests."""
    first_turn = req(prompt=300)
    warm = view("warm", "colocated", running=8, cached_prompt_tokens=32, chunk_tokens=1024)
    cold = view("cold", "colocated", running=0, chunk_tokens=1024)
    assert make_global_scheduler("prefix_aware").pick([warm, cold], first_turn) == "cold"
    assert make_global_scheduler("prefix_aware", running_weight=0.0).pick([warm, cold], first_turn) == "warm"
    later_turn = req(prompt=3000)
    holder = view("holder", "colocated", running=40, cached_prompt_tokens=2900, chunk_tokens=1024)
    assert make_global_scheduler("prefix_aware").pick([holder, cold], later_turn) == "holder"

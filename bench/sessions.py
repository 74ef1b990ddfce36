"""Workloads that reuse prompt prefixes: ShareGPT conversations replayed as sessions, and groups of
prompts sharing a long system prompt (SGLang's ``generated-shared-prefix``); and the oracle hit rate.

Workload names (``tetri bench compare -w NAME``; options are ``:key=value`` after the name):

* ``sessions[:turns=6:min_turns=2:think=1.0:max_output=128:ctx=4096]``: ``n`` ShareGPT conversations
  with at least ``min_turns`` human/gpt exchanges, replayed as sessions of at most ``turns`` turns.
  Turn k's prompt is the conversation so far as chat messages (the chat template applies): the
  first k-1 questions and answers, then question k. A session's first turn arrives by a Poisson
  process (``rate`` = sessions/s); turn k is sent ``think_s`` after turn k-1's answer has arrived
  (exponential, mean ``think``, drawn when the workload is built). Output lengths are the dataset's
  answers in tokens, capped at ``max_output`` (exact: ``max_tokens`` + ``ignore_eos``). A session
  ends before the first turn whose prompt + output would pass ``ctx`` tokens; a conversation that
  cannot give ``min_turns`` such turns is skipped.
* ``shared-prefix[:groups=8:per_group=8:system=1024:question=64:output=32:shuffle=1]``: ``groups``
  system prompts of ``system`` tokens, each followed by ``per_group`` different questions of
  ``question`` tokens (synthetic words, cut to exact token counts); every request is a single-turn
  session of its own, Poisson arrivals at ``rate`` requests/s, in shuffled order (``shuffle=0``:
  group after group).

**The representation** (for the live runner and the simulator alike). A workload is a list of
:class:`SessionRequest`, a :class:`~bench.workloads.BenchRequest` with:

* ``session``, ``turn`` (0-based) and ``id`` = ``{session}-t{turn}``;
* ``arrival``: the session's start for its first turn; for a later turn, the start too (a placeholder:
  the turn really arrives ``think_s`` after the turn ``after`` ends, which only the run knows);
* ``after``: the id of the previous turn (None for a first turn), ``think_s``: seconds after its answer;
* ``system`` (or None: the template's default), ``user`` (the new message), ``answer``: the stand-in
  answer (the dataset's, cut to ``output_tokens`` tokens): live runs put the model's real answer in
  the history instead, so live prompt lengths differ a little from the stand-in ones;
* ``prompt_tokens``: tokens of the templated prompt (stand-in history); ``shared_tokens``: the length
  of the common prefix of this prompt and the previous turn's prompt + answer (for shared-prefix
  requests: of this prompt and its group's system prompt part, the same for the whole group);
* ``blocks``: :func:`backends.prefix.block_hashes` of the full 16-token blocks of prompt + answer
  (answer blocks only for sessions, whose next turn contains them): equal ids, equal prefixes. This
  is what ``orchestrator/sim`` reads (with ``after`` and ``think_s``) to model per-instance caches.

**The oracle hit rate**: the share of prompt tokens that ONE cache shared by all instances, with no
capacity limit, would have served, had every request gone to the instance holding its prefix. In
send order, each prompt reuses its longest run of leading full blocks already in that cache, up to
all but its last token (:func:`backends.prefix.reusable_tokens`, the engine's cap); its prompt blocks
then enter the cache, and when its answer has arrived, the full blocks of prompt + answer but the
answer's last token (the engine never computes that token's KV). So a session's turn k may reuse
turn k-1's prompt and answer, and the template's default system prompt is shared by all first turns;
a shared-prefix request reuses its group's system prompt unless it is the group's first one. Live,
prompts are tokenized here with the served model's tokenizer and chat template (checked against the
server's ``usage.prompt_tokens``), and answers are re-tokenized from their text: where the model
emitted a special token (skipped in the text) the engine's cached answer blocks differ from the
re-tokenized ones, a loss the oracle does not show. The measured hit rate is
``usage.prompt_tokens_details.cached_tokens`` over ``usage.prompt_tokens``, summed over requests,
and the workers' own ``prefix_hit_tokens`` / ``prefix_query_tokens`` counters over the run.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from backends.prefix import BLOCK_TOKENS, block_hashes, reusable_tokens
from bench.workloads import BenchRequest, Workload, poisson_arrivals, synthetic_prompt

SESSION_WORKLOADS = ("sessions", "shared-prefix")
_NS = "bench"  # block-hash namespace of the workloads' own block ids (any fixed string)
SESSION_DEFAULTS: dict[str, float] = {"turns": 6, "min_turns": 2, "think": 1.0, "max_output": 128, "ctx": 4096}
SHARED_DEFAULTS: dict[str, float] = {"groups": 8, "per_group": 8, "system": 1024, "question": 64, "output": 32,
                                     "shuffle": 1}  # fmt: skip


class ChatTokenizer(Protocol):
    def chat(self, messages: Sequence[dict[str, str]]) -> list[int]: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class HFChatTokenizer:
    """A transformers tokenizer as a ChatTokenizer (the chat template with the generation prompt)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        ids = self.tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys") and "input_ids" in ids:  # transformers 5: a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))


def default_tokenizer() -> ChatTokenizer:
    """The default model's tokenizer (SmolLM2-135M-Instruct), with its chat template."""
    from predictor.tokenizer import load_default_tokenizer

    return HFChatTokenizer(load_default_tokenizer())


@dataclass
class SessionRequest(BenchRequest):
    session: str = ""
    turn: int = 0
    after: str | None = None
    think_s: float = 0.0
    system: str | None = None
    user: str = ""
    answer: str = ""
    shared_tokens: int = 0
    blocks: tuple[int, ...] = ()

    def messages(self, history: Sequence[dict[str, str]] = ()) -> list[dict[str, str]]:
        """The chat messages of this turn after `history` (the earlier questions and answers)."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*head, *history, {"role": "user", "content": self.user}]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class OracleCache:
    """One unbounded prefix cache shared by all instances (see the module docstring): what a
    perfect placement over infinite caches would reuse."""

    def __init__(self) -> None:
        self.keys: set[int] = set()
        self.hit_tokens = 0
        self.query_tokens = 0

    def reuse(self, prompt_ids: Sequence[int]) -> int:
        """A prompt is sent: the tokens it could reuse; its blocks enter the cache."""
        keys = block_hashes(prompt_ids, _NS)
        n = 0
        for k in keys:
            if k not in self.keys:
                break
            n += 1
        hit = reusable_tokens(len(prompt_ids), n)
        self.hit_tokens += hit
        self.query_tokens += len(prompt_ids)
        self.keys.update(keys)
        return hit

    def answered(self, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> None:
        """The answer arrived: prompt + answer blocks whose KV exists (not the last token's) enter."""
        seq = [*prompt_ids, *answer_ids]
        self.keys.update(block_hashes(seq[: max(0, len(seq) - 1)], _NS))


class SessionWorkload(Workload):
    """A Workload of SessionRequests; re-timing moves session starts only (turns keep following
    their previous answers)."""

    def sessions(self) -> list[list[SessionRequest]]:
        by: dict[str, list[SessionRequest]] = {}
        for r in self.requests:
            assert isinstance(r, SessionRequest)
            by.setdefault(r.session, []).append(r)
        return [sorted(v, key=lambda r: r.turn) for v in by.values()]

    def with_arrivals(self, rate: float, seed: int = 0) -> SessionWorkload:
        sessions = self.sessions()
        starts = poisson_arrivals(len(sessions), rate, seed)
        reqs: list[BenchRequest] = []
        for turns, t in zip(sessions, starts, strict=True):
            reqs.extend(replace(r, arrival=t) for r in turns)
        reqs.sort(key=lambda r: (r.arrival, r.turn if isinstance(r, SessionRequest) else 0))
        unit = "sessions/s" if self.name.startswith("sessions") else "requests/s"
        return SessionWorkload(self.name, reqs, {**self.meta, "rate": rate, "rate_unit": unit, "arrival_seed": seed})

    def scaled(self, factor: float, max_prompt: int | None = None, max_output: int | None = None) -> Workload:
        raise ValueError(
            f"{self.name}: session workloads take their lengths from their name's options "
            "(e.g. sessions:max_output=64:ctx=2048), not --length-scale/--max-prompt/--max-output"
        )

    def stats(self) -> dict[str, Any]:
        st = super().stats()
        st.pop("classes", None)
        n = max(1, len(self.requests))
        prompt = sum(r.prompt_tokens for r in self.requests)
        st["sessions"] = len(self.sessions())
        st["mean_shared_tokens"] = sum(getattr(r, "shared_tokens", 0) for r in self.requests) / n
        st["oracle_hit_rate"] = offline_oracle(self).hit_tokens / prompt if prompt else 0.0
        return st


def offline_oracle(wl: Workload) -> OracleCache:
    """The oracle over the stand-in token ids: turns in session order, sessions by start time
    (prompt and answer blocks rebuilt from `blocks`, which hash the same ids)."""
    oracle = OracleCache()
    for r in sorted(wl.requests, key=lambda r: (r.arrival, getattr(r, "turn", 0))):
        blocks = getattr(r, "blocks", ())
        pb = r.prompt_tokens // BLOCK_TOKENS
        n = 0
        for k in blocks[:pb]:
            if k not in oracle.keys:
                break
            n += 1
        hit = reusable_tokens(r.prompt_tokens, n)
        oracle.hit_tokens += hit
        oracle.query_tokens += r.prompt_tokens
        oracle.keys.update(blocks)
    return oracle


# --- builders ------------------------------------------------------------------------------------
def parse_options(name: str, defaults: dict[str, float]) -> dict[str, float]:
    base, *opts = name.split(":")
    out = dict(defaults)
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in defaults:
            raise ValueError(f"{base}: unknown option {opt!r}; options: {', '.join(f'{k}=' for k in defaults)}")
        try:
            out[key] = float(value)
        except ValueError as exc:
            raise ValueError(f"{base}: option {key} needs a number, got {value!r}") from exc
        if out[key] < 0:
            raise ValueError(f"{base}: option {key} must be >= 0")
    return out


def build_session_workload(
    name: str,
    n: int,
    seed: int = 0,
    max_context: int | None = None,
    tokenizer: ChatTokenizer | None = None,
    dialogues: Sequence[tuple[str, Sequence[tuple[str, str]]]] | None = None,
) -> SessionWorkload:
    """A ``sessions...`` (n sessions) or ``shared-prefix...`` workload (its own count: groups x
    per_group; n is ignored), every request at arrival 0 until re-timed."""
    base = name.split(":")[0]
    tok = tokenizer or default_tokenizer()
    if base == "sessions":
        o = parse_options(name, SESSION_DEFAULTS)
        ctx = int(o["ctx"]) if max_context is None else min(int(o["ctx"]), max_context)
        if dialogues is None:
            from bench.sharegpt import load_dialogues

            dialogues = load_dialogues(max(1, int(o["min_turns"])))
        reqs = sharegpt_sessions(dialogues, n, tok, random.Random(seed), turns=int(o["turns"]),
                                 min_turns=max(1, int(o["min_turns"])), think_s=o["think"],
                                 max_output=int(o["max_output"]), max_context=ctx)  # fmt: skip
        meta = {"source": "sharegpt", "seed": seed, "options": {**o, "ctx": ctx}}
    elif base == "shared-prefix":
        o = parse_options(name, SHARED_DEFAULTS)
        reqs = shared_prefix(tok, random.Random(seed), groups=int(o["groups"]), per_group=int(o["per_group"]),
                             system_len=int(o["system"]), question_len=int(o["question"]),
                             output_len=int(o["output"]), shuffle=bool(o["shuffle"]))  # fmt: skip
        meta = {"source": "synthetic", "seed": seed, "options": o}
    else:
        raise ValueError(f"unknown session workload {name!r}; known: {', '.join(SESSION_WORKLOADS)}")
    return SessionWorkload(name, list(reqs), meta)


def sharegpt_sessions(
    dialogues: Sequence[tuple[str, Sequence[tuple[str, str]]]],
    n: int,
    tok: ChatTokenizer,
    rng: random.Random,
    turns: int = 6,
    min_turns: int = 2,
    think_s: float = 1.0,
    max_output: int = 128,
    max_context: int = 4096,
) -> list[SessionRequest]:
    order = list(range(len(dialogues)))
    rng.shuffle(order)
    out: list[SessionRequest] = []
    made = 0
    for idx in order:
        if made >= n:
            break
        did, pairs = dialogues[idx]
        sid = f"s{made}"
        history: list[dict[str, str]] = []
        prev_seq: list[int] = []
        session: list[SessionRequest] = []
        for k, (question, full_answer) in enumerate(pairs[:turns]):
            answer_ids = tok.encode(full_answer)[: max(1, max_output)]
            answer = tok.decode(answer_ids)
            msgs = [*history, {"role": "user", "content": question}]
            prompt_ids = tok.chat(msgs)
            if len(prompt_ids) + len(answer_ids) > max_context:
                break
            answer_ids = tok.encode(answer)  # as the next turn's template will hold it
            think = rng.expovariate(1.0 / think_s) if think_s > 0 and k else 0.0
            session.append(SessionRequest(
                id=f"{sid}-t{k}", arrival=0.0, prompt_tokens=len(prompt_ids), output_tokens=max(1, len(answer_ids)),
                cls="first-turn" if k == 0 else "later-turn", session=sid, turn=k,
                after=session[-1].id if session else None, think_s=think, user=question, answer=answer,
                shared_tokens=common_prefix(prompt_ids, prev_seq), source_index=idx,
                blocks=tuple(block_hashes([*prompt_ids, *answer_ids], _NS)),
            ))  # fmt: skip
            history = [*msgs, {"role": "assistant", "content": answer}]
            prev_seq = [*prompt_ids, *answer_ids]
        if len(session) >= min_turns:
            out.extend(session)
            made += 1
    if made < n:
        raise ValueError(f"only {made} of {n} sessions fit (min_turns {min_turns}, context {max_context})")
    return out


def exact_text(tok: ChatTokenizer, tokens: int, seed: int) -> str:
    """Synthetic words cut to `tokens` tokens of this tokenizer."""
    ids = tok.encode(synthetic_prompt(tokens + 8, seed=seed))[:tokens]
    return tok.decode(ids)


def shared_prefix(
    tok: ChatTokenizer,
    rng: random.Random,
    groups: int = 8,
    per_group: int = 8,
    system_len: int = 1024,
    question_len: int = 64,
    output_len: int = 32,
    shuffle: bool = True,
) -> list[SessionRequest]:
    base_seed = rng.randrange(1 << 30)
    out: list[SessionRequest] = []
    for g in range(groups):
        system = exact_text(tok, system_len, base_seed + 7919 * g)
        head = tok.chat([{"role": "system", "content": system}])  # ends with the generation prompt
        for i in range(per_group):
            question = exact_text(tok, question_len, base_seed + 7919 * g + 1 + i)
            ids = tok.chat([{"role": "system", "content": system}, {"role": "user", "content": question}])
            shared = common_prefix(ids, head)
            out.append(SessionRequest(
                id=f"g{g}q{i}-t0", arrival=0.0, prompt_tokens=len(ids), output_tokens=max(1, output_len),
                cls="shared-prefix", session=f"g{g}q{i}", system=system, user=question, shared_tokens=shared,
                blocks=tuple(block_hashes(ids, _NS)),
            ))  # fmt: skip
    if shuffle:
        rng.shuffle(out)
    # sessions keep this order when re-timed (poisson starts are sorted): index them so it holds
    return [replace(r, session=f"{k:05d}-{r.session}", id=f"{k:05d}-{r.session}-t0") for k, r in enumerate(out)]


def prefix_summary(records: Sequence[dict[str, Any]], engine: dict[str, int] | None = None) -> dict[str, Any]:
    """Hit rates of a run: from usage.cached_tokens, from the workers' counters, and the oracle's."""
    ok = [r for r in records if r.get("error") is None]
    prompt = sum(int(r.get("prompt_tokens") or 0) for r in ok)
    cached = sum(int(r.get("cached_tokens") or 0) for r in ok)
    oracle = sum(int(r.get("oracle_tokens") or 0) for r in ok)
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "oracle_tokens": oracle,
        "cache_hit_rate": cached / prompt if prompt else None,
        "oracle_hit_rate": oracle / prompt if prompt else None,
        "hit_of_oracle": cached / oracle if oracle else None,
        "prompt_token_mismatches": sum(1 for r in ok if r.get("client_prompt_tokens") not in (None, r.get(
            "prompt_tokens"))),
    }  # fmt: skip
    if engine is not None:
        q, h = engine.get("query_tokens", 0), engine.get("hit_tokens", 0)
        out["engine_query_tokens"], out["engine_hit_tokens"] = q, h
        out["engine_hit_rate"] = h / q if q else None
    return out


def is_session_workload(name: str) -> bool:
    return name.split(":")[0] in SESSION_WORKLOADS


# --- report ----------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def prefix_table(systems: dict[str, Any], workload: dict[str, Any]) -> list[str]:
    """Markdown lines: per system, TTFT/JCT and hit rates against the oracle's (a session run's
    summary carries them; an empty list otherwise)."""
    if not any("oracle_hit_rate" in s["summary"] for s in systems.values()):
        return []
    unit = workload.get("rate_unit", "requests/s")
    lines = [
        f"\nPrefix caching ({workload.get('sessions', '?')} sessions, {workload.get('requests', '?')} requests, "
        f"starts at {workload.get('rate', '?')} {unit}, closed loop; hit rate = cached / prompt tokens from "
        "`usage.prompt_tokens_details.cached_tokens`, engine = the workers' counters, oracle = one unbounded "
        "shared cache, see bench/sessions.py):\n",
        "| system | mean TTFT ms | p99 TTFT ms | mean JCT ms | hit rate | engine hit rate | oracle | hit / oracle "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in systems.items():
        m = s["summary"]
        lines.append(
            f"| {name} | {_ms(m.get('mean_ttft_ms'))} | {_ms(m.get('p99_ttft_ms'))} | {_ms(m.get('mean_jct_ms'))} | "
            f"{_pct(m.get('cache_hit_rate'))} | {_pct(m.get('engine_hit_rate'))} | {_pct(m.get('oracle_hit_rate'))} | "
            f"{_pct(m.get('hit_of_oracle'))} | {m.get('errors', 0)} |"
        )
    return lines


def prefix_plot(wname: str, systems: dict[str, Any], path: Any) -> bool:
    """A PNG: mean/p99 TTFT and hit rate vs the oracle's per system (False: nothing to plot)."""
    if not any("oracle_hit_rate" in s["summary"] for s in systems.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(systems)
    x = range(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, (key, label) in enumerate((("mean_ttft_ms", "mean TTFT"), ("p99_ttft_ms", "p99 TTFT"))):
        a.bar([i + 0.4 * k for i in x], [systems[n]["summary"].get(key) or 0 for n in names], 0.4, label=label)
    a.set_ylabel("ms")
    a.legend(fontsize=8)
    for k, (key, label) in enumerate((("cache_hit_rate", "hit rate"), ("oracle_hit_rate", "oracle"))):
        b.bar([i + 0.4 * k for i in x], [100 * (systems[n]["summary"].get(key) or 0) for n in names], 0.4, label=label)
    b.set_ylabel("% of prompt tokens")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xticks([i + 0.2 for i in x])
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{wname}: prefix caching")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

"""Synchronous reads of the store: requests, instances, events and the figures built from them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Engine, func, select

from orchestrator.store.models import REQUEST_STATES
from orchestrator.store.writer import EVENTS, INSTANCES, REQUESTS


class Reads:
    """Reads run on the caller's thread and see what is committed (``flush()`` first for the latest)."""

    engine: Engine
    _db: Callable[[], AbstractContextManager[None]]

    def get_request(self, id: str) -> dict[str, Any] | None:
        """The committed row of one request (call ``flush()`` first to see the latest writes)."""
        with self._db(), self.engine.connect() as conn:
            row = conn.execute(select(REQUESTS).where(REQUESTS.c.id == str(id))).mappings().first()
        return dict(row) if row is not None else None

    def list_requests(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Requests, latest arrival first, optionally of one state."""
        q = select(REQUESTS)
        if state is not None:
            q = q.where(REQUESTS.c.state == state)
        q = q.order_by(REQUESTS.c.arrival.desc(), REQUESTS.c.id).limit(limit)
        with self._db(), self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def get_instance(self, id: str) -> dict[str, Any] | None:
        with self._db(), self.engine.connect() as conn:
            row = conn.execute(select(INSTANCES).where(INSTANCES.c.id == str(id))).mappings().first()
        return dict(row) if row is not None else None

    def list_instances(self) -> list[dict[str, Any]]:
        """All instances, by id."""
        with self._db(), self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(INSTANCES).order_by(INSTANCES.c.id)).mappings()]

    def list_events(
        self,
        kind: str | None = None,
        limit: int = 100,
        *,
        instance_id: str | None = None,
        request_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Events, newest first, optionally of one kind / instance / request."""
        q = select(EVENTS)
        if kind is not None:
            q = q.where(EVENTS.c.kind == kind)
        if instance_id is not None:
            q = q.where(EVENTS.c.instance_id == instance_id)
        if request_id is not None:
            q = q.where(EVENTS.c.request_id == request_id)
        q = q.order_by(EVENTS.c.id.desc()).limit(limit)
        with self._db(), self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def recent_traffic(self, since: float, limit: int = 20000) -> list[dict[str, Any]]:
        """Finished requests that arrived at or after ``since`` (epoch seconds), oldest first, with
        their arrival, prompt and completion token counts: the traffic a split is planned for."""
        r = REQUESTS.c
        q = (
            select(r.arrival, r.prompt_tokens, r.completion_tokens)
            .where(
                r.state == "finished",
                r.arrival >= since,
                r.prompt_tokens.is_not(None),
                r.completion_tokens > 0,
            )
            .order_by(r.arrival.desc())
            .limit(limit)
        )
        with self._db(), self.engine.connect() as conn:
            rows = [dict(x) for x in conn.execute(q).mappings()]
        return rows[::-1]

    def request_stats(self) -> dict[str, int]:
        """Number of requests per state (every known state present, zero when none)."""
        q = select(REQUESTS.c.state, func.count()).group_by(REQUESTS.c.state)
        with self._db(), self.engine.connect() as conn:
            counts = {state: n for state, n in conn.execute(q)}
        out = {s: 0 for s in REQUEST_STATES}
        for state, n in counts.items():
            out[state if state is not None else "unknown"] = int(n)
        return out

    def predictor_accuracy(self, granularity: int, num_buckets: int | None = None) -> dict[str, Any]:
        """Live accuracy of the length predictor at bucket width ``granularity``.

        Over finished requests that have both ``predicted_bucket`` and ``completion_tokens`` and
        were predicted at this granularity (or recorded no granularity). The true bucket is
        ``completion_tokens // granularity``, capped at ``num_buckets - 1`` when the classifier has
        a last open-ended bucket. Returns ``{granularity, n, accuracy, within_one_bucket}``;
        accuracy and within_one_bucket are None when n == 0.
        """
        g = int(granularity)
        if g <= 0:
            raise ValueError("granularity must be positive")
        r = REQUESTS.c
        q = (
            select(r.predicted_bucket, r.completion_tokens, func.count())
            .where(
                r.state == "finished",
                r.predicted_bucket.is_not(None),
                r.completion_tokens.is_not(None),
                (r.predictor_granularity == g) | r.predictor_granularity.is_(None),
            )
            .group_by(r.predicted_bucket, r.completion_tokens)
        )
        n = exact = near = 0
        with self._db(), self.engine.connect() as conn:
            for pred, tokens, count in conn.execute(q):
                true = int(tokens) // g
                if num_buckets is not None:
                    true = min(true, num_buckets - 1)
                n += count
                if int(pred) == true:
                    exact += count
                if abs(int(pred) - true) <= 1:
                    near += count
        return {
            "granularity": g,
            "n": n,
            "accuracy": exact / n if n else None,
            "within_one_bucket": near / n if n else None,
        }

"""The trace context adapters forward to engines (W3C `traceparent`), set by orchestrator/tracing.py.

Here, not in orchestrator/, because the adapters read it and backends/ never imports the orchestrator.
"""

from __future__ import annotations

import contextvars

# The traceparent header value for calls to engines made on behalf of the current request (None:
# no tracing, no header). A context variable, so adapters need no extra argument: every request
# runs in its own task, and tasks it spawns (an SGLang P/D pair's shielded send) inherit it.
TRACEPARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("tetri_traceparent", default=None)

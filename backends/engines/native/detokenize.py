"""Incremental detokenization with stop strings.

Text deltas come from decoding a short window of ids (vLLM's prefix/read offsets), so a token
that ends inside a multi-byte UTF-8 character yields no text until the character completes.
Text that could still turn into a stop string is held back until it can't; on a stop string the
text is cut just before it.
"""

from __future__ import annotations

# Prompt tokens decoded ahead of the output so tokenizers that drop a leading space at the start
# of a decode (SentencePiece) still produce the right first delta.
PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # decoded output text so far (complete characters only)
        self.emitted = 0  # characters of `text` already handed out
        self.stop = [s for s in (stop or []) if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text delta, whether a stop string was hit)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        if not self.stop:
            delta = self.text[self.emitted :]
            self.emitted = len(self.text)
            return delta, False
        start = max(0, self.emitted - self._max_stop)
        hit = -1
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (hit == -1 or i < hit):
                hit = i
        if hit != -1:
            delta = self.text[self.emitted : max(hit, self.emitted)]
            self.text = self.text[:hit]
            self.emitted = len(self.text)
            return delta, True
        # Hold back the longest tail that is the beginning of some stop string.
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.emitted), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        end = len(self.text) - hold
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta, False

    def flush(self) -> str:
        """The request ends for another reason: hand out everything held back."""
        tail = self._decode(self.ids[self.prefix_offset :])
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        if len(tail) > len(prefix_text):  # an unfinished character: emit what the bytes give
            self.text += tail[len(prefix_text) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

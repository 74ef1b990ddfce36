"""The orchestrator renders the chat template once and encodes it: the ids must equal what
`apply_chat_template(tokenize=True)` gives, or engines would see another prompt."""

from __future__ import annotations

import pytest

from orchestrator.tokenizer import PromptBuilder

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 👋 wörld"},
     {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "again <|im_end|> literally"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_ids_equal_apply_chat_template(messages):
    builder = PromptBuilder("smollm2-135m-instruct")
    text, ids = builder.chat(messages)
    ref = builder.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert ids == list(ref)
    assert text.endswith("<|im_start|>assistant\n")

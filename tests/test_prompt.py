"""Prompt layout: documents close the system message, so chunk caches serve every conversation."""

from dataclasses import replace

import pytest

from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.generate import SamplingParams
from ragcache.engine.prompt import build_rag_prompt
from ragcache.engine.runner import RagRequest

from conftest import DOCUMENTS, QUESTION


def test_layout_prefix_chunks_suffix(tokenizer):
    history = (("user", "Hi there"), ("assistant", "Hello!"))
    parts = build_rag_prompt(tokenizer, QUESTION, DOCUMENTS[:2], history=history)
    prefix, suffix = tokenizer.decode(parts.prefix_ids), tokenizer.decode(parts.suffix_ids)
    assert prefix.endswith("Documents:\n\n") and "Hi there" not in prefix
    assert [tokenizer.decode(c) for c in parts.chunk_ids] == [d + "\n\n" for d in DOCUMENTS[:2]]
    assert suffix.index("Hi there") < suffix.index("Hello!") < suffix.index(QUESTION)
    assert parts.prefix_ids == build_rag_prompt(tokenizer, "Another question?", DOCUMENTS[:1]).prefix_ids


def test_a_chat_reuses_chunks_cached_for_a_single_question(make_engine):
    engine = make_engine()
    engine.generate(RagRequest(QUESTION, DOCUMENTS, sampling=SamplingParams(max_tokens=1)))
    chat = RagRequest("And the longest?", DOCUMENTS, history=(("user", QUESTION), ("assistant", "The Amazon.")),
                      sampling=SamplingParams(max_tokens=1), prefix_cache=False)
    assert engine.generate(chat).chunk_hits == 4  # the history comes after the documents: their keys match
    # with the prefix cache, the question's path gives the system prefix and the documents at once
    parts = engine._prompt(chat)
    reused = engine.generate(replace(chat, prefix_cache=True)).prefix_cached_tokens
    assert reused >= (len(parts.prefix_ids) + parts.num_chunk_tokens) // 16 * 16


@pytest.mark.parametrize("history", [(("system", "x"),), (("user", " "),)])
def test_bad_history_turns_are_refused(tokenizer, history):
    with pytest.raises(InvalidRequestError, match=r"history\[0\]"):
        build_rag_prompt(tokenizer, QUESTION, history=history)

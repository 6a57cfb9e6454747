"""The tool-call text format (toolformat.py) and the conversation prefix index (storage/labels.py)."""

import pytest

from ragcache.engine.chat import ChatTurn, ToolCall, ToolSpec
from ragcache.storage.labels import PromptLabels
from ragcache.engine.prompt import build_rag_prompt, split_template, template_knows_tools
from ragcache.engine.toolformat import CallStream, parse_tool_calls, render_call, turn_text

TOOLS = (ToolSpec("get_weather", "Weather in a city", {"type": "object", "properties": {"city": {"type": "string"}}}),
         ToolSpec("get_time"))


def test_calls_are_parsed_with_their_arguments_text_as_written():
    text = "Let me check.\n" + render_call("get_weather", '{"city":  "Paris"}') + "\n" + render_call("get_time", "{}")
    parsed = parse_tool_calls(text, TOOLS)
    assert [c.name for c in parsed.calls] == ["get_weather", "get_time"]
    assert parsed.calls[0].arguments == '{"city":  "Paris"}' and parsed.content == "Let me check."


def test_a_call_of_an_unlisted_tool_or_broken_json_stays_text():
    text = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call> <tool_call>{"name": "get_time", </tool_call>'
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.calls == () and parsed.malformed == 2 and parsed.content == text.strip()


def streamed(text, step):
    """CallStream's events for text pushed in pieces of step characters."""
    stream, events = CallStream(), []
    for i in range(0, len(text), step):
        events += stream.push(text[i:i + step])
    return events + stream.flush()


def assembled(events):
    """index -> [name, arguments] as a client adds up the deltas."""
    calls = {}
    for event in events:
        if event[0] == "call":
            calls[event[1]] = [event[2], ""]
        elif event[0] == "arguments":
            calls[event[1]][1] += event[2]
    return calls


@pytest.mark.parametrize("step", [1, 2, 5, 13, 1000])
def test_the_stream_splits_text_and_calls_at_any_piece_size(step):
    text = "Sure.\n" + render_call("get_weather", '{"city": "Paris"}') + "\n" + render_call("get_time", '{"a":{"b":1}}')
    events = streamed(text, step)
    calls = assembled(events)
    assert "".join(e[1] for e in events if e[0] == "text") == "Sure.\n"
    assert calls == {0: ["get_weather", '{"city": "Paris"}'], 1: ["get_time", '{"a":{"b":1}}']}


def test_text_that_only_looks_like_a_call_start_is_released_at_the_end():
    stream = CallStream()
    assert stream.push("a <tool_ca") == [("text", "a ")]
    assert stream.flush() == [("text", "<tool_ca")]


def test_tool_turns_render_as_hermes_text_and_results_merge_into_one_user_turn(tokenizer):
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    history = (ChatTurn("user", "Weather in Paris and Rome?"), ChatTurn("assistant", "", (call,)),
               ChatTurn("tool", "sunny", tool_call_id="call_1"), ChatTurn("tool", "rainy", tool_call_id="call_2"))
    assert turn_text(history[1]) == ("assistant", render_call("get_weather", '{"city": "Paris"}'))
    before, after = split_template(tokenizer, "System.", "", False, history, TOOLS)
    assert not template_knows_tools(tokenizer)
    assert '"name": "get_weather"' in before and "<tools>" in before  # tools close the system message
    assert after.count("<tool_response>") == 2 and after.count("<|im_start|>user") == 2
    assert after.endswith("<|im_start|>assistant\n")


def test_an_empty_question_is_allowed_only_after_a_tool_result(tokenizer):
    from ragcache.engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="question is empty"):
        build_rag_prompt(tokenizer, "", history=[("user", "hi"), ("assistant", "hello")])
    parts = build_rag_prompt(tokenizer, "", history=[ChatTurn("user", "hi"),
                                                     ChatTurn("assistant", "", (ToolCall("c", "get_time", "{}"),)),
                                                     ChatTurn("tool", "12:00", tool_call_id="c")], tools=TOOLS)
    assert parts.num_tokens > 0


def test_a_template_that_knows_tools_renders_them_itself(tokenizer):
    import copy

    templated = copy.copy(tokenizer)
    templated.chat_template = (
        "{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}[call {{ c.function.name }} "
        "{{ c.function.arguments | tojson }}]{% endfor %}{% endif %}</{{ m.role }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    history = (ChatTurn("user", "hi"), ChatTurn("assistant", "", (ToolCall("c", "get_weather", '{"city": "Rome"}'),)),
               ChatTurn("tool", "sunny", tool_call_id="c"))
    before, after = split_template(templated, "System.", "", False, history, TOOLS)
    assert template_knows_tools(templated)
    assert before.startswith("TOOLS:get_weather,get_time\n<system>System.") and "<tools>" not in before
    assert '[call get_weather {"city": "Rome"}]' in after and "<tool>sunny</tool>" in after


def test_the_conversation_index_finds_the_longest_whole_prompt_a_new_prompt_extends():
    index = PromptLabels()
    index.index("t", "a", [1, 2, 3, 4])
    index.index("t", "b", [1, 2, 5])
    assert index.match("t", [1, 2, 3, 4, 9]) == ("a", 4)
    assert index.match("t", [1, 2, 3]) is None  # shares a prefix with a's prompt, does not extend it
    assert index.match("t", [1, 2, 3, 4]) is None  # the same prompt again is not a continuation
    assert index.match("other", [1, 2, 3, 4, 9]) is None  # tenants never see each other's
    index.index("t", "a", [1, 2, 3, 4, 7, 8])  # a's next turn replaces its earlier prompt
    assert index.match("t", [1, 2, 3, 4, 9]) is None and index.match("t", [1, 2, 3, 4, 7, 8, 1]) == ("a", 6)
    index.forget("t", "b")
    assert index.match("t", [1, 2, 5, 6]) is None and len(index) == 1


def test_the_conversation_index_forgets_the_least_recently_indexed_past_its_bound():
    index = PromptLabels(max_conversations=2)
    assert index.index("t", "a", [1]) == [] and index.index("t", "b", [2]) == []
    assert index.index("t", "c", [3]) == [("t", "a")]
    assert index.match("t", [1, 0]) is None and index.match("t", [3, 0]) == ("c", 1)


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_a_call_repeated_word_for_word_streams_once_and_a_near_repeat_streams_whole(step):
    text = CALL + "\n" + CALL + "\n" + render_call("get_weather", '{"city": "Paris", "unit": "c"}') + "\n" + CALL
    events = streamed(text, step)
    calls = assembled(events)
    assert calls == {0: ["get_weather", '{"city": "Paris"}'], 1: ["get_weather", '{"city": "Paris", "unit": "c"}']}
    assert [c.arguments for c in dict.fromkeys(parse_tool_calls(text, TOOLS).calls)] == [v[1] for v in calls.values()]


CALL = render_call("get_weather", '{"city": "Paris"}')


def test_a_repeated_call_is_noticed_when_it_closes():
    from ragcache.engine.toolformat import ends_in_repeated_call

    other = render_call("get_time", "{}")
    assert not ends_in_repeated_call(CALL) and not ends_in_repeated_call(CALL + "\n" + other)
    assert ends_in_repeated_call(CALL + "\n" + other + "\n" + CALL)
    assert not ends_in_repeated_call(CALL + "\n" + CALL[:-3])  # not closed yet


def test_a_repeat_cut_short_by_max_tokens_is_never_streamed():
    stream = CallStream()
    events = stream.push(CALL + "\n" + CALL[:-4]) + stream.flush()
    assert [e[2] for e in events if e[0] == "call"] == ["get_weather"]


def test_a_turn_is_indexed_without_its_generation_prompt_so_a_merged_boundary_still_matches():
    from ragcache.storage.labels import BOUNDARY_TOKENS, indexed_prompt

    prompt = list(range(100, 120))
    index = PromptLabels()
    index.index("t", "a", indexed_prompt(prompt))
    retokenized = prompt[:-1] + [999, 5, 6]  # the last prompt token merged with the answer's first
    assert index.match("t", retokenized) == ("a", len(prompt) - BOUNDARY_TOKENS)
    assert indexed_prompt([1, 2]) == (1,)

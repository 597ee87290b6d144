"""Chat data: conversations rendered in the tokenizer's own chat template (SmolLM2-135M-Instruct's real
tokenizer files, and templates saved by ``transformers`` into copies of it), with an answer-token mask
that ``recipes/inspect_data.py`` shows; the mask found from prefix renderings agrees with a template's
generation markers; bad conversations are one line naming the file and line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_main
from test_user_errors import assert_one_line, snapshot

PRE, INSPECT = "recipes/preprocess_data.py", "recipes/inspect_data.py"

CHATML = ("{%- for m in messages -%}"
          "{%- if m.role == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}{GEN_START}"
          "{%- if m.reasoning_content is defined and SHOW_REASONING -%}"
          "{{ '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}{%- endif -%}"
          "{{ m.content + '<|im_end|>' }}{GEN_END}{{ '\\n' }}"
          "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}"
          "{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
LAST_USER = ("{%- set ns = namespace(last_user=0) -%}{%- for m in messages -%}{%- if m.role == 'user' -%}"
             "{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}")


def template(markers: bool = False, reasoning: str = "true") -> str:
    """A ChatML template; ``reasoning='latest'`` shows reasoning only after the last user turn (as some
    reasoning models' templates do), which makes earlier turns render differently in longer conversations."""
    t = CHATML.replace("{GEN_START}", "{% generation %}" if markers else "")
    t = t.replace("{GEN_END}", "{% endgeneration %}" if markers else "")
    if reasoning == "latest":
        return LAST_USER + t.replace("SHOW_REASONING", "loop.index0 > ns.last_user")
    return t.replace("SHOW_REASONING", reasoning)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The real SmolLM2 tokenizer, and copies saved by transformers with other chat templates (or none)."""
    from transformers import AutoTokenizer

    from minitron_nemo.data import assets

    real = assets.smollm2_hf_dir()
    d = tmp_path_factory.mktemp("tokenizers")
    out = {"smollm2": real}
    for name, tmpl in {"markers": template(markers=True), "plain": template(), "reasoning": template(),
                       "reasoning_markers": template(markers=True), "latest": template(reasoning="latest"),
                       "none": None}.items():
        t = AutoTokenizer.from_pretrained(str(real))
        t.chat_template = tmpl
        t.save_pretrained(str(d / name))
        if tmpl is None:
            (d / name / "chat_template.jinja").unlink(missing_ok=True)
        out[name] = d / name
    t = AutoTokenizer.from_pretrained(str(real))  # header tokens and an end-of-turn token of their own
    t.add_special_tokens({"additional_special_tokens": list(HEADER_TOKENS)})
    t.eos_token = "<|eot|>"
    t.chat_template = HEADERS
    t.save_pretrained(str(d / "headers"))
    out["headers"] = d / "headers"
    return out


HEADER_TOKENS = ("<|begin|>", "<|start_header|>", "<|end_header|>", "<|eot|>")
HEADERS = ("{{- '<|begin|>' -}}{%- for m in messages -%}"
           "{{- '<|start_header|>' + m.role + '<|end_header|>\n\n' + m.content | trim + '<|eot|>' -}}"
           "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|start_header|>assistant<|end_header|>\n\n' -}}"
           "{%- endif -%}")


CONVERSATIONS = [
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "Who wrote The Tempest?"},
     {"role": "assistant", "content": "William Shakespeare wrote it.", "reasoning_content": "A late play."},
     {"role": "user", "content": "When?"},
     {"role": "assistant", "content": "Around 1610 or 1611.", "reasoning_content": "First staged 1611."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "A question with no answer yet."}],
    [{"role": "user", "content": "Call the tool."}, {"role": "assistant", "content": "Calling it."},
     {"role": "tool", "content": "{\"result\": 42}"}, {"role": "assistant", "content": "The result is 42."}],
]


def jsonl(path: Path, convs=CONVERSATIONS) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


def preprocess(src, tokenizer, prefix, *extra):
    p = run_main(PRE, "format=chat", f"input={src}", f"tokenizer={tokenizer}", f"output_prefix={prefix}", *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def inspect(prefix, index: int, *extra) -> dict:
    p = run_main(INSPECT, f"prefix={prefix}", f"index={index}", *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def test_smollm2_template_tokens_and_answer_mask(tmp_path, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok["smollm2"]))
    p = preprocess(jsonl(tmp_path / "c.jsonl"), tok["smollm2"], tmp_path / "chat")
    assert "3 of 4 conversations (1 without an answer" in p.stdout
    for doc, conv in zip((0, 1, 2), (CONVERSATIONS[0], CONVERSATIONS[1], CONVERSATIONS[3])):
        ex = inspect(tmp_path / "chat", doc)
        plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in conv]
        assert ex["tokens"] == list(hf.apply_chat_template(plain, tokenize=True, return_dict=True)["input_ids"])
        answers = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
        assert ex["answer"] == "\n".join(answers)  # every assistant turn and its end of turn, nothing else
        assert ex["answer_tokens"] == sum(len(hf(a, add_special_tokens=False)["input_ids"]) for a in answers)
    last = tmp_path / "last"
    preprocess(tmp_path / "c.jsonl", tok["smollm2"], last, "mask=last_assistant")
    assert inspect(last, 0)["answer"] == "Around 1610 or 1611.<|im_end|>"
    record = json.loads((tmp_path / "last.chat.json").read_text())
    assert record["mask"] == "last_assistant" and record["counts"]["written"] == 3


def test_prefix_spans_agree_with_generation_markers(tmp_path, tok):
    src = jsonl(tmp_path / "c.jsonl")
    for name in ("markers", "plain"):
        p = preprocess(src, tok[name], tmp_path / name)
        assert ("generation markers" in p.stdout) == (name == "markers")
    for doc in range(3):
        a, b = inspect(tmp_path / "markers", doc), inspect(tmp_path / "plain", doc)
        assert a["tokens"] == b["tokens"] and a["loss_mask"] == b["loss_mask"] and a["answer_tokens"] > 0


@pytest.mark.parametrize("name", ["reasoning", "reasoning_markers"])
def test_reasoning_in_or_out_of_the_mask(tmp_path, tok, name):
    src = jsonl(tmp_path / "c.jsonl")
    preprocess(src, tok[name], tmp_path / "with")
    preprocess(src, tok[name], tmp_path / "without", "reasoning=false")
    with_, without = inspect(tmp_path / "with", 0), inspect(tmp_path / "without", 0)
    assert with_["tokens"] == without["tokens"]
    assert with_["answer"].split("\n<|im_end|>")[0].startswith("<think>\nA late play.\n</think>")
    assert without["answer"] == "William Shakespeare wrote it.<|im_end|>\nAround 1610 or 1611.<|im_end|>"


def test_a_template_that_is_not_prefix_stable_is_refused(tmp_path, tok):
    src = jsonl(tmp_path / "c.jsonl")
    p = run_main(PRE, "format=chat", f"input={src}", f"tokenizer={tok['latest']}", f"output_prefix={tmp_path / 'x'}")
    assert_one_line(p, 2, f"{src}:1", "not prefix-stable", "mask=last_assistant")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c.jsonl"]
    preprocess(src, tok["latest"], tmp_path / "last", "mask=last_assistant")  # the last turn renders the same
    assert inspect(tmp_path / "last", 0)["answer"].startswith("<think>\nFirst staged 1611.\n</think>")


def test_parquet_written_by_datasets_equals_jsonl(tmp_path, tok):
    import datasets

    convs = [c for c in CONVERSATIONS if "reasoning_content" not in json.dumps(c)]
    datasets.Dataset.from_list([{"messages": c} for c in convs]).to_parquet(str(tmp_path / "c.parquet"))
    preprocess(jsonl(tmp_path / "c.jsonl", convs), tok["smollm2"], tmp_path / "j")
    preprocess(tmp_path / "c.parquet", tok["smollm2"], tmp_path / "p")
    for ext in (".bin", ".idx", ".mask.bin", ".mask.idx"):
        assert (tmp_path / f"j{ext}").read_bytes() == (tmp_path / f"p{ext}").read_bytes()


def test_overlong_conversations_are_dropped_or_truncated_and_counted(tmp_path, tok):
    src = jsonl(tmp_path / "c.jsonl")
    full = [inspect(tmp_path / "all", i) for i in range(3)] if preprocess(src, tok["smollm2"], tmp_path / "all") else []
    limit = sorted(len(e["tokens"]) for e in full)[1]  # the shortest two fit
    p = preprocess(src, tok["smollm2"], tmp_path / "drop", f"max_length={limit}")
    assert "2 of 4 conversations" in p.stdout and "1 dropped and 0 truncated" in p.stdout
    p = preprocess(src, tok["smollm2"], tmp_path / "cut", f"max_length={limit}", "overlong=truncate")
    cut = [inspect(tmp_path / "cut", i) for i in range(3)]
    assert "0 dropped and 1 truncated" in p.stdout and max(len(e["tokens"]) for e in cut) == limit
    longest = max(range(3), key=lambda i: len(full[i]["tokens"]))
    assert cut[longest]["tokens"] == full[longest]["tokens"][:limit]
    assert cut[longest]["loss_mask"] == full[longest]["loss_mask"][:limit]


ONE_ANSWER = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
BAD = {  # name: (records as JSONL text, an option, the tokenizer; needles)
    "unknown role": ('{"messages": [{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}]}\n',
                     None, "smollm2", ["c.jsonl:1", "role 'narrator'", "allowed: system, user, assistant, tool"]),
    "non-string content": ('{"messages": [{"role": "user", "content": ["a"]}]}\n', None, "smollm2",
                           ["c.jsonl:1", "message 0 (user) has content a list"]),
    "no messages": (ONE_ANSWER + '{"text": "plain"}\n', None, "smollm2", ["c.jsonl:2", "without 'messages'", "'text'"]),
    "invalid JSON": ('{"messages": [\n', None, "smollm2", ["c.jsonl:1", "invalid JSON"]),
    "reasoning on a user turn": ('{"messages": [{"role": "user", "content": "a", "reasoning_content": "b"}]}\n',
                                 None, "smollm2", ["c.jsonl:1", "reasoning_content", "assistant messages only"]),
    "no answers at all": ('{"messages": [{"role": "user", "content": "a"}]}\n', None, "smollm2",
                          ["holds no conversation with an answer token", "1 without an assistant turn"]),
    "no chat template": (ONE_ANSWER, None, "none", ["has no chat template", "chat model"]),
    "bad mask option": (ONE_ANSWER, "mask=everything", "smollm2",
                        ["mask='everything'", "allowed: assistant, last_assistant"]),
    "bad max_length": (ONE_ANSWER, "max_length=ten", "smollm2", ["max_length='ten'"]),
}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("earlier")
    preprocess(jsonl(tmp_path_factory.mktemp("src") / "c.jsonl"), tok["smollm2"], d / "out")
    return d


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_chat_input_is_one_line_and_writes_nothing(tmp_path, tok, earlier, name):
    records, option, tokenizer, needles = BAD[name]
    src = tmp_path / "c.jsonl"
    src.write_text(records)
    out = tmp_path / "out"
    for f in earlier.iterdir():  # an earlier chat dataset at the prefix stays as it was
        shutil.copy(f, tmp_path / f.name)
    before = snapshot(tmp_path)
    p = run_main(PRE, "format=chat", f"input={src}", f"tokenizer={tok[tokenizer]}", f"output_prefix={out}",
                 *([option] if option else []))
    assert_one_line(p, 2, *needles)
    assert snapshot(tmp_path) == before


def test_inspect_refuses_an_index_out_of_range(tmp_path, tok):
    preprocess(jsonl(tmp_path / "c.jsonl"), tok["smollm2"], tmp_path / "chat")
    p = run_main(INSPECT, f"prefix={tmp_path / 'chat'}", "index=3")
    assert_one_line(p, 2, "index=3 is out of range", "0..2")


def test_a_header_template_with_its_own_end_of_turn_token(tmp_path, tok):
    """A template in the style of Llama 3: a begin token once, role headers between special tokens, content
    trimmed, a dedicated end-of-turn token (the tokenizer's EOS) and nothing after it."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok["headers"]))
    preprocess(jsonl(tmp_path / "c.jsonl"), tok["headers"], tmp_path / "h")
    ex = inspect(tmp_path / "h", 2)  # the conversation with a tool turn
    conv = CONVERSATIONS[3]
    assert ex["tokens"] == list(hf.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
    assert ex["answer"] == "Calling it.<|eot|>\nThe result is 42.<|eot|>"
    eot = hf.convert_tokens_to_ids("<|eot|>")
    assert [t for t, m in zip(ex["tokens"], ex["loss_mask"]) if m].count(eot) == 2

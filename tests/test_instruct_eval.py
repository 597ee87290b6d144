"""The offline instruction-following evaluation: every instruction of our prompt set is checked by
IFEval's checker with the arguments the prompt states (an answer that follows it passes, one that does
not fails); recipes/evaluate_instruct.py answers through the chat template and writes its record; bad
input is one line."""

from __future__ import annotations

import json

import pytest

from conftest import run_main
from test_user_errors import assert_one_line, snapshot

RECIPE = "recipes/evaluate_instruct.py"

# instruction id -> (an answer that follows it, one that does not)
ANSWERS = {
    "change_case:english_lowercase": ("the storm breaks the ship apart.", "The storm breaks the ship apart."),
    "punctuation:no_comma": ("bees make honey from nectar", "bees, busy bees, make honey"),
    "length_constraints:number_words": ("Light bends in rain drops.", " ".join(["word"] * 45)),
    "detectable_format:number_bullet_lists": ("* one\n* two\n* three", "* one\n* two"),
    "startend:end_checker": ("The moons are many. That is all.", "The moons are many."),
    "startend:quotation": ('"Ahab chases the whale."', "Ahab chases the whale."),
    "detectable_format:title": ("<<The Pyramids>>\nThey were built of stone.", "They were built of stone."),
    "change_case:english_capital": ("THE WATER CYCLE NEVER STOPS.", "The water cycle never stops."),
    "detectable_content:postscript": ("Leaves turn red.\nP.S. Some turn gold.", "Leaves turn red."),
    "length_constraints:number_paragraphs": ("First part.\n***\nSecond part.", "Only one part."),
    "detectable_format:json_format": ('{"topic": "lighthouse", "use": "guides ships"}', "A lighthouse guides ships."),
    "keywords:forbidden_words": ("The press changed printing.", "The press was very important."),
}


def test_every_instruction_is_checked_as_its_prompt_states():
    from minitron_nemo.eval.instruct import INSTRUCTIONS, prompt_set, score

    assert sorted(ANSWERS) == sorted(i[0] for i in INSTRUCTIONS)
    prompts = prompt_set()
    assert len(prompts) == 72 and prompt_set() == prompts and prompt_set(5) == prompts[:5]
    for iid, (good, bad) in ANSWERS.items():
        p = next(p for p in prompts if p["instruction_id_list"] == [iid])
        assert score([p], [good])["prompt_strict"] == 1.0, (iid, good)
        assert score([p], [bad])["prompt_strict"] == 0.0, (iid, bad)
    two = next(p for p in prompts if len(p["instruction_id_list"]) == 2)
    r = score([two], [ANSWERS[two["instruction_id_list"][0]][0]])
    assert r["instructions"] == 2 and r["instruction_strict"] in (0.5, 1.0)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from hf_models import make_chat_model

    return make_chat_model(tmp_path_factory.mktemp("chat") / "hf")


def test_recipe_answers_through_the_chat_template_and_writes_its_record(tmp_path, chat_model):
    out = tmp_path / "instruct.json"
    p = run_main(RECIPE, f"model={chat_model}", "limit=3", "max_new_tokens=6", "samples=1", f"output={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["prompts"] == 3 and len(rec["answers"]) == 3 and rec["recipe"] == "evaluate_instruct"
    assert all(0.0 <= rec[k] <= 1.0 for k in ("prompt_strict", "instruction_strict", "prompt_loose"))
    assert "prompt_strict" in p.stdout and p.stdout.count("[answer]") == 1
    p = run_main(RECIPE, f"model={chat_model}", "limit=1", "max_new_tokens=2", f"output={out}")  # its own output
    assert p.returncode == 0 and json.loads(out.read_text())["prompts"] == 1


BAD = {
    "no model": (lambda t, m: [], ["model is required"]),
    "limit=0": (lambda t, m: [f"model={m}", "limit=0"], ["limit='0'", "an integer >= 1"]),
    "unknown argument": (lambda t, m: [f"model={m}", "temperature=0.7"], ["unknown argument 'temperature=0.7'"]),
    "not an HF dir": (lambda t, m: [f"model={t}"], ["no config.json"]),
    "no chat template": (lambda t, m: [f"model={no_template(t, m)}"], ["has no chat template"]),
    "output is a user's file": (lambda t, m: [f"model={m}", f"output={user_file(t)}"],
                                ["did not write", "never replaced"]),
}


def no_template(tmp, model):
    import shutil

    d = tmp / "plain"
    shutil.copytree(model, d)
    (d / "chat_template.jinja").unlink()
    return d


def user_file(tmp):
    f = tmp / "mine.json"
    f.write_text('{"mine": true}')
    return f


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line(tmp_path, chat_model, name):
    build, needles = BAD[name]
    args = build(tmp_path, chat_model)
    before = snapshot(tmp_path, chat_model)
    p = run_main(RECIPE, *args)
    assert_one_line(p, 2, *needles)
    assert snapshot(tmp_path, chat_model) == before


def test_batched_answers_equal_one_at_a_time(chat_model):
    from minitron_nemo.eval.generate import load_hf
    from minitron_nemo.eval.instruct import generate_chat, prompt_set

    model, tok = load_hf(chat_model)
    prompts = [p["prompt"] for p in prompt_set(5)]  # different lengths: left padding in a batch
    one = generate_chat(model, tok, prompts, 6, batch_size=1, log=None)
    assert generate_chat(model, tok, prompts, 6, batch_size=4, log=None) == one and all(one)

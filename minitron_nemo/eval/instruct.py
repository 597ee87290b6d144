"""An offline instruction-following score in the spirit of IFEval, with IFEval's own checkers.

The prompt set is ours (``prompt_set``), not Google's IFEval data, which lm-eval downloads at run time:
real topics (plays, novels, nature, history, science) crossed with verifiable instructions (case, commas,
length, bullet lists, keywords, forbidden words, an ending phrase, quotation, a title, JSON,
paragraphs, a postscript). Each instruction is checked by the checker class lm-eval 0.4.13 ships
(``lm_eval/tasks/ifeval``), strict and loose as IFEval scores them. Only checkers that need no
downloaded NLTK data are used, so scoring runs offline.

Answers are greedy generations through the model's own chat template (``generate_chat``).
"""

from __future__ import annotations

import time

import torch

TOPICS = (
    "the storm that opens Shakespeare's The Tempest",
    "the ghost of Hamlet's father",
    "Captain Ahab's hunt for the white whale in Moby-Dick",
    "Elizabeth Bennet's first meeting with Mr Darcy in Pride and Prejudice",
    "how bees make honey",
    "why leaves change colour in autumn",
    "the water cycle",
    "how a lighthouse guides ships at night",
    "the invention of the printing press",
    "the moons of Jupiter",
    "how a rainbow forms",
    "the building of the pyramids of Giza",
)

# instruction id -> (how the prompt asks for it, the checker's kwargs)
INSTRUCTIONS = (
    ("change_case:english_lowercase", "Your entire response must be in lowercase letters; no capital letters "
                                      "are allowed.", {}),
    ("punctuation:no_comma", "Do not use any commas in your response.", {}),
    ("length_constraints:number_words", "Answer in less than 40 words.", {"relation": "less than", "num_words": 40}),
    ("detectable_format:number_bullet_lists", "Your answer must contain exactly 3 bullet points, using markdown "
                                              "bullets such as:\n* This is a point.", {"num_bullets": 3}),
    ("startend:end_checker", "Finish your response with the exact phrase: That is all.",
     {"end_phrase": "That is all."}),
    ("startend:quotation", "Wrap your entire response in double quotation marks.", {}),
    ("detectable_format:title", "Give your answer a title wrapped in double angular brackets, such as "
                                "<<my title>>.", {}),
    ("change_case:english_capital", "Your entire response must be in English and in capital letters only.", {}),
    ("detectable_content:postscript", "At the end of your response, add a postscript starting with P.S.",
     {"postscript_marker": "P.S."}),
    ("length_constraints:number_paragraphs", "Write exactly 2 paragraphs, separated by the markdown divider ***.",
     {"num_paragraphs": 2}),
    ("detectable_format:json_format", "Wrap your entire output in JSON format.", {}),
    ("keywords:forbidden_words", "Do not use the words 'very' or 'really' in your response.",
     {"forbidden_words": ["very", "really"]}),
)


def prompt_set(n: int | None = None) -> list[dict]:
    """The prompts: topic ``i % 12`` with instruction ``i % 12`` and, from the second round on, a second
    instruction (``i // 12`` further on): 72 prompts, deterministic. ``n``: the first ``n``."""
    out = []
    for i in range(6 * len(TOPICS)):
        topic = TOPICS[i % len(TOPICS)]
        chosen = [INSTRUCTIONS[i % len(INSTRUCTIONS)]]
        if i >= len(TOPICS):
            chosen.append(INSTRUCTIONS[(i + i // len(TOPICS)) % len(INSTRUCTIONS)])
        chosen = list({c[0]: c for c in chosen}.values())  # one of each id
        out.append({"key": i, "prompt": f"Tell me about {topic}. " + " ".join(c[1] for c in chosen),
                    "instruction_id_list": [c[0] for c in chosen], "kwargs": [dict(c[2]) for c in chosen]})
    return out[:n] if n else out


def _ifeval():
    """lm-eval's IFEval scoring module, imported without its NLTK download attempt (offline; the checkers
    used here need no NLTK data)."""
    import contextlib
    import io

    import nltk

    download = nltk.download
    nltk.download = lambda *a, **k: False
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its import announces a download it did not make
            from lm_eval.tasks.ifeval import utils
    finally:
        nltk.download = download
    return utils


def score(prompts: list[dict], responses: list[str]) -> dict:
    """IFEval's four accuracies (prompt / instruction level, strict / loose) and per-prompt results."""
    utils = _ifeval()
    rows, acc = [], {"prompt_strict": 0, "prompt_loose": 0, "instruction_strict": 0, "instruction_loose": 0}
    n_instr = 0
    for p, r in zip(prompts, responses):
        inp = utils.InputExample(key=p["key"], instruction_id_list=p["instruction_id_list"], prompt=p["prompt"],
                                 kwargs=p["kwargs"])
        strict, loose = utils.test_instruction_following_strict(inp, r), utils.test_instruction_following_loose(inp, r)
        acc["prompt_strict"] += strict.follow_all_instructions
        acc["prompt_loose"] += loose.follow_all_instructions
        acc["instruction_strict"] += sum(strict.follow_instruction_list)
        acc["instruction_loose"] += sum(loose.follow_instruction_list)
        n_instr += len(p["instruction_id_list"])
        rows.append({"key": p["key"], "strict": strict.follow_instruction_list, "loose": loose.follow_instruction_list})
    n = max(len(rows), 1)
    return {"prompts": len(rows), "instructions": n_instr,
            **{k: v / (n if k.startswith("prompt") else max(n_instr, 1)) for k, v in acc.items()}, "rows": rows}


def generate_chat(model, tok, prompts: list, max_new_tokens: int, batch_size: int = 8, log=print,
                  min_new_tokens: int = 0) -> list[str]:
    """Greedy answers to prompts through the tokenizer's chat template (each stops at EOS), ``batch_size``
    prompts at a time (left-padded); a prompt is a user message's text or a list of messages ending with a
    user turn; ``min_new_tokens``: no end of turn before that many tokens. Progress with tokens/s and ETA."""
    out, t0, new = [], time.time(), 0
    side, tok.padding_side = tok.padding_side, "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tok.apply_chat_template(p if isinstance(p, list) else [{"role": "user", "content": p}],
                                             add_generation_prompt=True, tokenize=False)
                     for p in prompts[i:i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     min_new_tokens=min_new_tokens)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                answer = row[: int((row != pad).cumprod(0).sum()) + 1] if pad == tok.eos_token_id else row
                new += int((row != pad).sum())
                out.append(tok.decode(answer, skip_special_tokens=True))
            dt, done = time.time() - t0, len(out)
            if log:
                log(f"[instruct] {done}/{len(prompts)} prompts, {new / dt:.0f} tokens/s, "
                    f"ETA {dt / done * (len(prompts) - done):.0f}s")
    finally:
        tok.padding_side = side
    return out

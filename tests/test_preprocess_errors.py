"""recipes/preprocess_data.py and the dataset readers on bad input: exit code 2, one ``error: `` line naming
the bad file / line / value, no traceback, no temp files left, existing outputs untouched.

The recipe runs as a user runs it, warnings on: its ``main()`` in this process (``conftest.run_main``), and as
a real subprocess for the cases in REAL_PROCESS.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, earlier_dataset, run_main

from minitron_nemo.data import assets


@pytest.fixture(scope="module")
def hf_dir():
    return assets.smollm2_hf_dir()


def _user_run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def _fails(*args, real_process=False) -> str:
    """Run ``python *args``; assert it is refused the user-error way; return the error line."""
    p = _user_run(*args) if real_process else run_main(*args)
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: "), p.stderr[-3000:]
    assert len(lines) == 1, p.stderr[-3000:]  # nothing else on stderr (warnings included)
    return lines[-1]


def _jsonl(path, records, raw_lines=()):
    """Write ``records`` as JSONL, then ``raw_lines`` (bytes) verbatim."""
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")


GOOD = [{"text": f"Line {i} of a small test corpus."} for i in range(300)]  # > one 256-document batch


def _case(case, d):
    """(input file, extra args, substrings the error must contain)."""
    if case == "empty_jsonl":
        f = d / "empty.jsonl"
        f.write_bytes(b"")
        return f, [], [str(f), "no documents"]
    if case == "blank_text":
        f = d / "blank.txt"
        f.write_text("\n   \n\t\n")
        return f, ["doc=paragraph"], [str(f), "no documents"]
    if case == "blank_jsonl_lines":
        f = d / "blank.jsonl"
        f.write_text("\n\n  \n")
        return f, [], [str(f), "no documents"]
    f = d / "in.jsonl"
    _jsonl(f, GOOD[:3])
    if case == "eod_too_big":
        return f, ["eod=999999"], ["eod=999999", "0..49151"]
    if case == "eod_negative":
        return f, ["eod=-1"], ["eod=-1", "0..49151"]
    if case == "eod_unknown_token":
        return f, ["eod=<|no_such_token|>"], ["<|no_such_token|>", "0..49151"]
    if case == "invalid_json":  # after a full batch was written to the temp files
        _jsonl(f, GOOD, [b'{"text": "unterminated'])
        return f, [], [f"{f}:301", "invalid JSON"]
    if case == "missing_key":
        _jsonl(f, GOOD[:1] + [{"body": "x"}])
        return f, [], [f"{f}:2", "'text'", "json_key="]
    if case == "non_string_value":
        _jsonl(f, GOOD[:1] + [{"text": 42}])
        return f, [], [f"{f}:2", "'text'", "int", "string"]
    if case == "null_value":
        _jsonl(f, GOOD[:1] + [{"text": None}])
        return f, [], [f"{f}:2", "'text'", "string"]
    if case == "not_an_object":
        _jsonl(f, [], [b"[1, 2]"])
        return f, [], [f"{f}:1", "list", "object"]
    if case == "lone_surrogate":
        _jsonl(f, GOOD[:2], [b'{"text": "bad \\ud800 escape"}'])
        return f, [], [f"{f}:3", "surrogate"]
    if case == "latin1_jsonl":
        _jsonl(f, GOOD[:1], ['{"text": "caf\u00e9"}'.encode("latin-1")])
        return f, [], [str(f), "line 2", "UTF-8", "0xe9"]
    if case == "latin1_text":
        f = d / "latin1.txt"
        f.write_bytes("Un caf\u00e9 cr\u00e8me.\n".encode("latin-1"))
        return f, [], [str(f), "UTF-8", "0xe9"]
    raise AssertionError(case)


# the recipe's command line for each kind of mistake; the variants (and these) through the library below
CLI_CASES = ["empty_jsonl", "eod_too_big", "eod_negative", "invalid_json", "non_string_value", "latin1_jsonl",
             "latin1_text"]
REAL_PROCESS = {"empty_jsonl", "invalid_json"}  # a real process: exit code and stderr as a terminal shows them
IN_PROCESS_CASES = ["blank_text", "blank_jsonl_lines", "eod_unknown_token", "missing_key", "null_value",
                    "not_an_object", "lone_surrogate"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_preprocess_refuses(case, hf_dir, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    old = earlier_dataset(out / "keep", hf_dir)
    f, extra, expect = _case(case, d)
    msg = _fails("recipes/preprocess_data.py", f"input={f}", f"tokenizer={hf_dir}", f"output_prefix={out}/keep",
                 *extra, real_process=case in REAL_PROCESS)
    for s in expect:
        assert s in msg, (s, msg)
    assert sorted(os.listdir(out)) == ["keep.bin", "keep.idx"]  # no temp files, old outputs untouched
    assert {n: (out / n).read_bytes() for n in old} == old


def test_training_recipe_refuses_truncated_index(hf_dir, tmp_path):
    """A truncated ``.idx`` given as ``data.blend`` stops the recipe at its config check, naming the file."""
    from minitron_nemo.data.indexed import HFTokenizer, write_indexed_dataset

    write_indexed_dataset([r["text"] for r in GOOD[:20]], HFTokenizer(hf_dir), tmp_path / "ds")
    idx = tmp_path / "ds.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    msg = _fails("recipes/correct_teacher.py", f"workdir={tmp_path}/wd", f"teacher.checkpoint={tmp_path}/t",
                 f"teacher.corrected_checkpoint={tmp_path}/c", "data.source=indexed", f"data.blend={tmp_path}/ds")
    assert str(idx) in msg and "corrupt or truncated" in msg


@pytest.mark.parametrize("case", IN_PROCESS_CASES + CLI_CASES)
def test_preprocess_errors_in_process(case, hf_dir, tmp_path):
    """The same checks through the library calls the recipe makes (fast): a one-line UserError."""
    from minitron_nemo.data.indexed import HFTokenizer, iter_documents, write_indexed_dataset
    from minitron_nemo.errors import UserError

    d = tmp_path / "in"
    d.mkdir()
    f, extra, expect = _case(case, d)
    opts = dict(a.split("=", 1) for a in extra)
    with pytest.raises(UserError) as e:
        tok = HFTokenizer(hf_dir, eod=opts.get("eod"))
        write_indexed_dataset(iter_documents([f], opts.get("doc", "file")), tok, tmp_path / "out",
                              source=f"input {f}")
    msg = str(e.value)
    assert "\n" not in msg
    for s in expect:
        assert s in msg, (s, msg)
    assert sorted(os.listdir(tmp_path)) == ["in"]

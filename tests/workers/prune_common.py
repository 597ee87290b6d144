"""Shared fixtures of the pruning tests: calibration text, a tiny tokenizer, small checkpoints."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_text(path: Path) -> Path:
    """~300 KB of deterministic English-ish text (stdlib sources and docstrings)."""
    import argparse as a, json as j, logging as lg, pathlib as pl, textwrap as tw, typing as ty
    text = "\n".join(Path(m.__file__).read_text() for m in (a, j.decoder, lg, pl, tw, ty))
    path.write_text(text)
    return path


def make_tokenizer(text_file: Path, out_dir: Path, vocab_size: int = 250) -> None:
    """A small BPE tokenizer (ids < ``vocab_size``) saved into an HF model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train([str(text_file)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out_dir))


def make_spread_hf_model(family: str, path: Path, seed: int = 0, std: float = 0.15) -> Path:
    """Like ``hf_models.make_hf_model`` but with weights large enough (std 0.15) that heads and neurons
    clearly differ (tiny-init models have near-tied importance scores, making rankings fragile)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import make_hf_model

    return make_hf_model(family, path, seed, std=std)


def small_checkpoint(tmp: Path, family: str = "llama", tp: int = 1, seed: int = 0) -> Path:
    """Random HF model of ``family`` (+ tokenizer) imported as a minitron_nemo checkpoint."""
    hf = make_spread_hf_model(family, tmp / f"hf_{family}", seed=seed)
    text = tmp / "calib.txt"
    if not text.exists():
        make_text(text)
    make_tokenizer(text, hf)
    ckpt = tmp / f"ckpt_{family}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "recipes" / "import_hf.py"), f"source={hf}", f"output={ckpt}"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return ckpt


def checkpoint_with_valid_text(tmp: Path, family: str = "llama"):
    """``small_checkpoint`` plus ``tmp/valid.txt``: 20,000 characters from the middle of the calibration
    text (the held-out text of the short distillation runs). Returns ``(tmp, checkpoint)``."""
    ckpt = small_checkpoint(tmp, family)
    text = (tmp / "calib.txt").read_text()
    (tmp / "valid.txt").write_text(text[len(text) // 2: len(text) // 2 + 20000])
    return tmp, ckpt


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("tmp")
    ap.add_argument("--family", default="llama")
    a = ap.parse_args()
    print(json.dumps({"ckpt": str(small_checkpoint(Path(a.tmp), a.family))}))

"""lm-evaluation-harness on exported HF models, with two offline tasks built from held-out plays.

* ``shakespeare_mc``: a passage and 4 candidate continuations (the true one and 3 drawn from other
  places in the held-out text); accuracy of picking the true one (chance = 0.25).
* ``shakespeare_lastword``: LAMBADA-style last word of a line given the passage before it
  (accuracy of the greedy completion and word perplexity).

Task YAMLs live in ``minitron_nemo/eval/tasks``; their data files are generated deterministically
from the held-out text into a directory next to the results.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from minitron_nemo.errors import UserError

TASK_DIR = Path(__file__).parent / "tasks"
OFFLINE_TASKS = tuple(sorted(p.stem for p in TASK_DIR.glob("*.yaml")))


def _lines(text_file) -> list[str]:
    lines = [l.strip() for l in Path(text_file).read_text(encoding="utf-8", errors="replace").splitlines()]
    return [l for l in lines if len(l.split()) >= 4 and not l.isupper()]


def build_task_data(text_file, out_dir, n_docs: int = 200, seed: int = 0, context_lines: int = 4) -> Path:
    """Write ``shakespeare_mc.jsonl`` and ``shakespeare_lastword.jsonl`` from ``text_file``."""
    rng = random.Random(seed)
    lines = _lines(text_file)
    if len(lines) < 10 * context_lines:
        raise UserError(f"text_file={text_file} has too few lines ({len(lines)}) to build the tasks")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    starts = rng.sample(range(len(lines) - context_lines - 1), min(n_docs, len(lines) - context_lines - 1))
    mc, lw = [], []
    for s in starts:
        context = " ".join(lines[s: s + context_lines])
        true = lines[s + context_lines]
        others = set()
        while len(others) < 3:
            j = rng.randrange(len(lines))
            if abs(j - (s + context_lines)) > context_lines and lines[j] != true:
                others.add(lines[j])
        choices = [true, *sorted(others)]
        rng.shuffle(choices)
        mc.append({"context": context, "choices": choices, "label": choices.index(true)})
        words = true.split()
        last = re.sub(r"[^\w'-]+$", "", words[-1])
        if last:
            lw.append({"context": context + " " + " ".join(words[:-1]), "target": last})
    for name, docs in (("shakespeare_mc", mc), ("shakespeare_lastword", lw)):
        with open(out / f"{name}.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
    return out


def write_task_configs(data_dir, conf_dir) -> Path:
    """Task YAMLs with their data paths filled in, for ``TaskManager(include_path=...)``."""
    conf = Path(conf_dir)
    conf.mkdir(parents=True, exist_ok=True)
    for p in TASK_DIR.glob("*.yaml"):
        (conf / p.name).write_text(p.read_text().replace("{DATA_DIR}", str(Path(data_dir).resolve())))
    return conf


def run_lm_eval(hf_dir, tasks, text_file, work_dir, *, limit=None, batch_size: int = 8,
                num_fewshot: int | None = None, dtype: str = "float32", seed: int = 0) -> dict:
    """Run lm-eval's ``hf`` model on ``tasks`` (offline tasks and/or standard names cached locally).
    Without a network, Hugging Face's offline mode is set first, so a standard task whose dataset is not
    in the local cache fails at once (one line) instead of retrying."""
    standard = [t for t in tasks if t not in OFFLINE_TASKS]
    offline = bool(standard) and go_offline_without_network()
    import lm_eval
    from lm_eval.tasks import TaskManager

    work = Path(work_dir)
    include = None
    if any(t in OFFLINE_TASKS for t in tasks):
        if text_file is None:
            raise UserError("the offline tasks need eval.text_file (held-out text)")
        data = build_task_data(text_file, work / "lm_eval_data", seed=seed)
        include = str(write_task_configs(data, work / "lm_eval_tasks"))
    manager = TaskManager(include_path=include, verbosity="ERROR")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval task(s) {unknown} not found; allowed: {', '.join(OFFLINE_TASKS)} or a "
                        f"standard lm-eval task whose dataset is in the local HF cache")
    try:
        if standard:  # their datasets first, before the model loads: a missing one fails at once
            from lm_eval.tasks import get_task_dict

            get_task_dict(standard, manager)
        res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(hf_dir), "dtype": dtype},
                                      tasks=list(tasks), batch_size=batch_size, limit=limit,
                                      num_fewshot=num_fewshot, task_manager=manager, log_samples=False,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      bootstrap_iters=0, device="cpu" if not _cuda() else "cuda")
    except Exception as e:  # datasets' own errors for a dataset it cannot fetch (no common base class)
        if not (offline or isinstance(e, (ConnectionError, OSError)) or "offline" in str(e).lower()):
            raise
        cache = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
        raise UserError(f"lm-eval task(s) {', '.join(standard)}: the dataset is not in the local Hugging Face cache "
                        f"({cache}){' and there is no network' if offline else ''} "
                        f"({type(e).__name__}); allowed: a task cached by a run with network, or the offline tasks "
                        f"{', '.join(OFFLINE_TASKS)}") from None
    return {t: {k.split(",")[0]: v for k, v in m.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for t, m in res["results"].items()}


def go_offline_without_network(host: str = "huggingface.co", timeout: float = 1.5) -> bool:
    """True (and Hugging Face's offline mode set) when ``HF_HUB_OFFLINE`` is already set or ``host`` cannot
    be reached within ``timeout`` seconds."""
    import socket
    import sys

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        reachable = False
    else:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            reachable = True
        except OSError:
            reachable = False
    if reachable:
        return False
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for mod, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                      ("datasets.config", "HF_DATASETS_OFFLINE")):
        if mod in sys.modules:  # imported earlier in this process: their constants were read already
            setattr(sys.modules[mod], attr, True)
    return True


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()

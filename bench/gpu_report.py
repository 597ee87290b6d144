"""A GPU suite's JSON (bench/gpu_suite.sh) as the Markdown table docs/gpu.md shows.

    python bench/gpu_report.py docs/gpu_suite_h200.json

Each benchmark: its headline ratio's median and spread over its rounds, the target set before any
measurement, and the step times or rates behind it; the tests part: its counts or why it stopped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gpu_suite import pick

# What each benchmark's result holds besides its headline, as (label, dotted path, unit) rows.
DETAILS = {
    "mfu": [("step", "step_seconds", "s"), ("TFLOP/s", "tflops", "")],
    "kd_step_vs_ideal": [("student step", "step_seconds.student", "s"), ("KD step", "step_seconds.kd", "s"),
                         ("FLOP-ideal KD / student", "ideal", "")],
    "kd_vs_hf_loop": [("our KD step", "step_seconds.ours", "s"), ("transformers loop", "step_seconds.transformers", "s")],
    "calibration_vs_forward": [],
    "kd_loss_memory_vs_ce": [],
    "offline_vs_student": [("student step", "step_seconds.student", "s"), ("offline step", "step_seconds.offline", "s"),
                           ("online step", "step_seconds.online", "s"), ("offline / online", "offline_over_online", "")],
}


def fmt(v, unit: str = "") -> str:
    if isinstance(v, dict) and "median" in v:
        return f"{v['median']:.3g}{unit} [{v['min']:.3g}, {v['max']:.3g}]"
    if isinstance(v, (int, float)):
        return f"{v:.4g}{unit}"
    return "-"


def row(key: str, e: dict) -> str:
    if e.get("status") != "ok":
        return f"| `{key}` | {e.get('status')}: {e.get('error') or e.get('why', '')} | | |"
    head = f"**{e['median']:.3f}** [{e['min']:.3f}, {e['max']:.3f}], n = {e['n']}"
    details = []
    for label, path, unit in DETAILS.get(key, []):
        try:
            details.append(f"{label} {fmt(pick(e['result'], path), unit)}")
        except (KeyError, TypeError):  # a result without it (an older benchmark's JSON)
            continue
    return f"| `{key}` | {head} | {e['good']} | {'; '.join(details)} |"


def tests_line(t: dict) -> str:
    if t.get("status") in ("passed", "skipped") or "passed" in t:
        return (f"`tests`: {t['status']}; passed {t.get('passed')}, failed {t.get('failed')}, errors {t.get('errors')}, "
                f"skipped {t.get('skipped')} in {t.get('seconds')} s")
    return f"`tests`: {t.get('status')}: {t.get('error') or t.get('why')} ({t.get('seconds', '-')} s)"


def report(d: dict) -> str:
    dev = d.get("device") or {}
    lines = [f"Device {dev.get('name')}, Python {dev.get('python')}, torch {dev.get('torch')} (CUDA {dev.get('cuda')}), "
             f"megatron-core {dev.get('megatron_core')}, transformers {dev.get('transformers')}; "
             f"the suite took {d.get('elapsed_s')} s{' (dry run)' if d.get('dry_run') else ''}.", "",
             "| key | median [min, max] over rounds | target | behind it (median [min, max]) |", "|---|---|---|---|"]
    lines += [row(k, d[k]) for k in DETAILS if k in d]
    lines += ["", tests_line(d.get("tests", {}))]
    return "\n".join(lines)


def main():
    if len(sys.argv) != 2:
        print("error: usage: python bench/gpu_report.py GPU_SUITE_JSON", file=sys.stderr)
        sys.exit(2)
    path = Path(sys.argv[1])
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"error: {path}: not a GPU suite JSON ({e})", file=sys.stderr)
        sys.exit(2)
    print(report(d))


if __name__ == "__main__":
    main()

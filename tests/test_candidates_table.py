"""The one candidates table writer (prune/artifacts.write_candidates) for both rankings: with an MoE
``target_active_params`` budget the ratio column is active parameters over the budget, in the zero-shot
table and in the table of the search ranked by short distillation (workflows/search.py). No model, no
subprocess."""

import csv

import pytest

from minitron_nemo.models.builder import count_parameters
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.prune import artifacts
from minitron_nemo.prune.targets import Targets, budget, new_config

SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


@pytest.fixture(scope="module")
def moe():
    """(source config, active-parameter budget targets, zero-shot table of two MoE candidates best first)."""
    mc = ModelConfig(family="qwen3_moe", num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                     num_query_groups=2, kv_channels=32, vocab_size=256, qk_layernorm=True, num_moe_experts=8,
                     moe_router_topk=2, moe_ffn_hidden_size=128).validate()
    targets = Targets(target_active_params=0.75 * count_parameters(mc, active=True))
    table = []
    for rank, (experts, width, loss) in enumerate(((6, 96, 2.5), (4, 128, 2.75)), 1):
        c = new_config(mc, Targets(target_num_moe_experts=experts, target_moe_ffn_hidden_size=width))
        table.append({"rank": rank, **{k: getattr(c, k) for k in SHAPE}, "num_moe_experts": experts,
                      "moe_ffn_hidden_size": width, "active_params": count_parameters(c, active=True),
                      "params": count_parameters(c), "loss": loss, "ppl": 10.0})
    assert all(r["params"] > r["active_params"] for r in table)  # the two counts differ, so the test can tell
    return mc, targets, table


def ratio_column(md: str) -> tuple[str, list]:
    """(header, values) of candidates.md's last column."""
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    return rows[0][-1].strip(), [float(r[-1]) for r in rows[1:]]


def test_zero_shot_table_counts_active_params(moe, tmp_path):
    mc, targets, table = moe
    b = budget(mc, targets)
    artifacts.write_candidates(tmp_path, table, b, artifacts.counted_column(targets))
    md = (tmp_path / "candidates.md").read_text()
    assert f"budget {b} active params, ranked by zero-shot calibration loss" in md
    header, ratios = ratio_column(md)
    assert header == "active_params/budget"
    assert ratios == [round(r["active_params"] / b, 3) for r in table]


def test_ranked_search_table_counts_active_params(moe, tmp_path):
    from minitron_nemo.workflows.search import Outcome, candidate_name

    mc, targets, table = moe
    results = [{"name": candidate_name(z), "zero_shot_rank": z["rank"], "valid_curve": [[0, 3.0], [2, loss]],
                "valid_loss_start": 3.0, "valid_loss_end": loss} for z, loss in zip(table, (2.25, 2.0))]
    o = Outcome.of(table, results, mc, targets, 2)
    o.save(tmp_path)
    b = budget(mc, targets)
    md = (tmp_path / "candidates.md").read_text()
    assert md.startswith(f"# Pruning candidates (budget {b} active params)")
    assert "after a 2-iteration distillation" in md
    header, ratios = ratio_column(md)
    assert header == "active_params/budget"
    rows = list(csv.DictReader(open(tmp_path / "candidates.csv")))
    assert [int(r["rank"]) for r in rows] == [1, 2] and [int(r["zero_shot_rank"]) for r in rows] == [2, 1]
    assert ratios == [round(int(r["active_params"]) / b, 3) for r in rows]
    assert ratios != [round(int(r["params"]) / b, 3) for r in rows]  # the bug: total params over an active budget
    assert (tmp_path / "search.png").is_file()


def test_dense_ranked_table_unchanged(tmp_path):
    """A dense budget: the ranked table's title and ratio column over total params."""
    from minitron_nemo.workflows.search import Outcome

    rows = [{"rank": 1, "zero_shot_rank": 1, **dict(zip(SHAPE, (2, 64, 128, 4, 2))), "params": 900,
             "zero_shot_loss": 2.5, "valid_loss_start": 3.0, "valid_loss_end": 2.0}]
    Outcome(rows, {}, 1000, 2).save(tmp_path)
    md = (tmp_path / "candidates.md").read_text().splitlines()
    assert md[0] == "# Pruning candidates (budget 1000 params)" and md[1] == "" and md[3] == ""
    assert md[4].endswith("| params/budget |") and md[-1].endswith("| 0.900 |")

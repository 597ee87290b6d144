# Entry points. Each target creates .venv with the pinned set (requirements.lock) when missing;
# test-mcore019 creates .venv-mcore019 (the same set plus requirements-mcore019.txt) instead.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Second leg: the newest supported megatron-core (requirements-mcore019.txt) in its own virtualenv.
VENV_MCORE019  ?= .venv-mcore019
PY_MCORE019    := $(VENV_MCORE019)/bin/python
STAMP_MCORE019 := $(VENV_MCORE019)/.installed
# A representative subset of what depends on Megatron-Core's version (about 4 min on 2 cores with two xdist
# workers, its venv installed while leg 1 runs): pruning importance invariance across layouts, bitwise training
# resume, PP=2 vs PP=1 distillation, MoE distillation, packed sequences (THD) at TP=2 / PP=2, the distributed
# optimizer at DP=2 (equal to the replicated one, bitwise resume, resumed at another layout), and the families
# whose layers differ most, against transformers, each checkpoint imported at TP=1 and loaded at other layouts:
# Gemma 3 (windows on some layers, four norms; logits at TP=1, TP=2, PP=2), gpt-oss (MoE at TP=2 x EP=2, sinks,
# YaRN; logits at TP=1, TP=2, PP=2, TP=2 x EP=2), Nemotron-H (Megatron-Core's hybrid model, 0.19's HybridModel;
# logits at TP=1, TP=2, PP=2) and the Mamba-2 CPU kernels in Megatron-Core's mixer.
MCORE019_TESTS ?= tests/test_prune_importance.py tests/test_training.py::test_resume_is_bitwise \
	tests/test_training.py::test_pp2_matches_pp1 \
	tests/test_moe.py::test_moe_student_distils_logs_aux_loss_and_resumes_bitwise \
	tests/test_chat_training.py::test_packed_logits_equal_each_conversation_alone_at_tp2_and_pp2 \
	tests/test_dist_optimizer.py::test_sharded_state_matches_the_replicated_optimizer_and_resumes_exactly \
	tests/test_dist_optimizer.py::test_a_checkpoint_resumes_at_another_layout_or_optimizer \
	tests/test_gemma3.py::test_logits_match_transformers_at_tp1_tp2_and_pp2 \
	tests/test_gpt_oss.py::test_logits_match_transformers_at_tp1_tp2_pp2_and_ep2 \
	tests/test_nemotron_h.py::test_logits_match_transformers_at_tp1_tp2_pp2 tests/test_mamba_cpu.py
PYTEST_ARGS ?=
# Test files are dealt to TEST_WORKERS pytest-xdist processes (one file stays on one worker, so module
# fixtures are built once); TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
EXPERIMENT_ARGS ?=

.PHONY: venv venv-mcore019 test test-fast test-mcore019 demo experiment clean-venv

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Every run writes runs/test_timings/<leg>.tsv (each test's and each file's wall time, slowest first).
test: $(STAMP)
	TEST_TIMINGS_NAME=leg1 $(PY) -m pytest -q --durations=15 $(XDIST) $(PYTEST_ARGS) tests

# The developer loop: everything but the end-to-end recipe runs (marker e2e: the experiment, the stage
# chains and the ranked search, the real SmolLM2 checkpoint, jobs on a real Slurm). CI runs them all.
test-fast: $(STAMP)
	TEST_TIMINGS_NAME=fast $(PY) -m pytest -q --durations=15 $(XDIST) -m "not e2e" $(PYTEST_ARGS) tests

venv-mcore019: $(STAMP_MCORE019)

# Same pinned set as .venv, then megatron-core 0.19.x over it (--no-deps --ignore-requires-python:
# 0.17+ declares Python >=3.12, the CI machine has 3.11 only). Reuses pip's cache from `make venv`.
$(STAMP_MCORE019): requirements.lock requirements-mcore019.txt pyproject.toml
	test -x $(PY_MCORE019) || $(PYTHON) -m venv $(VENV_MCORE019)
	$(PY_MCORE019) -m pip install -q --upgrade pip
	$(PY_MCORE019) -m pip install -q -r requirements.lock
	$(PY_MCORE019) -m pip install -q --no-deps --ignore-requires-python -r requirements-mcore019.txt
	$(PY_MCORE019) -m pip install -q --no-deps -e .
	touch $(STAMP_MCORE019)

test-mcore019: $(STAMP_MCORE019)
	$(PY_MCORE019) -W ignore -c "import sys, megatron.core as m; print('megatron-core', m.__version__, 'on Python', sys.version.split()[0])"
	TEST_TIMINGS_NAME=leg2 $(PY_MCORE019) -m pytest -q --durations=15 $(XDIST) $(PYTEST_ARGS) $(MCORE019_TESTS)

demo: $(STAMP)
	$(PY) recipes/demo.py

experiment: $(STAMP)
	$(PY) recipes/experiments/minitron_smollm2.py $(EXPERIMENT_ARGS)

clean-venv:
	rm -rf $(VENV) $(VENV_MCORE019)

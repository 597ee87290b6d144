"""The ``eval`` group's schema (recipes/evaluate.py): perplexity, lm-eval tasks, samples and throughput.
Every count is checked here, when the job config is composed (before any model loads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from minitron_nemo.checks import at_least, choice
from minitron_nemo.errors import UserError


@dataclass
class EvalGenerate:
    prompts: List[str] = field(default_factory=list)
    max_new_tokens: int = 32

    def check(self, at: str) -> None:
        at_least(f"{at}.max_new_tokens", self.max_new_tokens, 1)
        for i, prompt in enumerate(self.prompts):
            if not str(prompt).strip():
                raise UserError(f"{at}.prompts[{i}]={prompt!r} is empty; allowed: prompts with text to continue")


@dataclass
class EvalThroughput:
    enabled: bool = False
    batch_size: int = 1
    prompt_length: int = 128
    generation_length: int = 64
    repeats: int = 3

    def check(self, at: str) -> None:
        for k in ("batch_size", "prompt_length", "generation_length", "repeats"):
            at_least(f"{at}.{k}", getattr(self, k), 1)


@dataclass
class EvalGroup:
    text_file: str = MISSING
    seq_length: int = 1024
    micro_batch_size: int = 4
    max_tokens: Optional[int] = None
    backend: str = "megatron"
    output: Optional[str] = None
    perplexity: bool = True
    lm_eval_tasks: List[str] = field(default_factory=list)
    lm_eval_limit: Optional[int] = None
    lm_eval_batch_size: int = 8
    generate: EvalGenerate = field(default_factory=EvalGenerate)
    throughput: EvalThroughput = field(default_factory=EvalThroughput)

    def check(self, at: str) -> None:
        at_least(f"{at}.seq_length", self.seq_length, 2)
        at_least(f"{at}.micro_batch_size", self.micro_batch_size, 1)
        at_least(f"{at}.max_tokens", self.max_tokens, 2, optional=True)
        choice(f"{at}.backend", self.backend, ("megatron", "transformers"))
        at_least(f"{at}.lm_eval_limit", self.lm_eval_limit, 1, optional=True)
        at_least(f"{at}.lm_eval_batch_size", self.lm_eval_batch_size, 1)

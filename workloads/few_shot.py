"""Few-shot prompting: one shared prompt, ``width`` branches from step 1, each gaining a token per step."""

from __future__ import annotations

from dataclasses import dataclass

from workloads.trace import Trace, Workload, check_int, tree_trace


@dataclass
class FewShot(Workload):
    """``width`` sibling branches under the prompt until ``max_seq_len`` (paper: prompt + 400, 399 steps)."""

    prompt_len: int = 4000
    width: int = 20
    max_seq_len: int = 4400

    name = "few_shot"

    def __post_init__(self) -> None:
        check_int("prompt_len", self.prompt_len)
        check_int("width", self.width)
        check_int("max_seq_len", self.max_seq_len, self.prompt_len + 2)

    def trace(self) -> Trace:
        steps = self.max_seq_len - self.prompt_len - 1
        w = self.width
        return tree_trace(
            f"few_shot(w={w})",
            self.prompt_len,
            [-1] + [0] * w,
            [1 - self.prompt_len] + [1] * w,
            [self.prompt_len] + [steps] * w,
            self.max_seq_len,
        )

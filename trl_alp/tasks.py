"""The offline tasks that users, config files and the experiments name: datasets, verifiable rewards, a tool.

* datasets: `arithmetic_dataset`, `addition_dataset`, `digits_dataset` (generated, no download) and
  `gsm8k_to_prompts` (GSM8K's columns to ``prompt`` / ``answer``);
* rewards: `REWARD_FUNCS` by name (``trl-alp train --reward_funcs correctness number_format``);
* the `calculator` tool (``tools: [trl_alp.tasks:calculator]`` in a config file);
* `TASKS` / `load_task`: a task's prompts and its rewards, by name.

The rewards parse the completion's last number and compare it with the ``answer`` column. `math-verify` (and
TRL's `accuracy_reward`, built on it) target LaTeX / ``\\boxed{}`` answers, which small chat models rarely write, so a
plain last-number check is the verifiable reward that fits these integer tasks.
"""

from __future__ import annotations

import ast
import functools
import operator
import random
import re
from collections.abc import Callable

from datasets import Dataset

SYSTEM_PROMPT = "Solve the problem. End your reply with the final answer as a number."
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

_WORD_PROBLEMS = (
    ("Tom has {a} apples and buys {b} more. How many apples does he have now?", lambda a, b: a + b),
    ("A box holds {a} pens. {b} pens are taken out. How many pens are left?", lambda a, b: a - b),
    ("There are {a} rows with {b} chairs each. How many chairs are there?", lambda a, b: a * b),
    ("Sara reads {a} pages a day for {b} days. How many pages does she read?", lambda a, b: a * b),
)
_ARITHMETIC = (("What is {a} + {b}?", lambda a, b: a + b), ("What is {a} - {b}?", lambda a, b: a - b))


def arithmetic_dataset(n: int = 256, seed: int = 0, max_operand: int = 20) -> Dataset:
    """Procedurally generated arithmetic and word problems with integer answers (conversational prompts).

    Columns: ``prompt`` (system + user messages) and ``answer`` (the integer as a string).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        template, solve = rng.choice(_WORD_PROBLEMS + _ARITHMETIC)
        a, b = rng.randint(2, max_operand), rng.randint(1, max_operand)
        if "-" in template or "left" in template:
            a, b = max(a, b), min(a, b)
        rows.append(
            {
                "prompt": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": template.format(a=a, b=b)},
                ],
                "answer": str(solve(a, b)),
            }
        )
    return Dataset.from_list(rows)


ANSWER_ONLY_PROMPT = "Reply with only the number."


def addition_dataset(n: int = 128, seed: int = 0, max_operand: int = 9) -> Dataset:
    """Single-digit additions ("What is 3 + 4?") under a system prompt that asks for the bare number.

    The demo's task. SmolLM2-135M-Instruct already answers part of them with the right sum, often in a few tokens
    ("3 + 4 = 7"), and part with a long detour that a short completion budget cuts off before any correct number:
    within every group of completions some earn the reward and some do not, so GRPO has a signal from its first step
    and a few LoRA steps can move the reward. Columns as in `arithmetic_dataset`.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        rows.append(
            {
                "prompt": [
                    {"role": "system", "content": ANSWER_ONLY_PROMPT},
                    {"role": "user", "content": f"What is {a} + {b}?"},
                ],
                "answer": str(a + b),
            }
        )
    return Dataset.from_list(rows)


def gsm8k_to_prompts(dataset: Dataset) -> Dataset:
    """Map GSM8K's ``question`` / ``answer`` (``... #### 42``) to ``prompt`` / ``answer`` columns."""

    def convert(row):
        return {
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["question"]}],
            "answer": row["answer"].split("####")[-1].strip().replace(",", ""),
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


def _text(completion) -> str:
    # a tool-calling turn may end on a message without "content" (only tool_calls)
    return (completion[-1].get("content") or "") if isinstance(completion, list) else completion


def last_number(text: str) -> str | None:
    """The last number in `text` (thousands separators dropped), or ``None``."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's last number equals the reference answer, else 0.0."""
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        found = last_number(_text(completion))
        rewards.append(float(found is not None and float(found) == float(reference)))
    return rewards


def number_format_reward(completions, **kwargs) -> list[float]:
    """0.2 for a reply that contains a number at all: a small shaping signal for tiny models."""
    return [0.2 if last_number(_text(c)) is not None else 0.0 for c in completions]


_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"unsupported expression element {ast.dump(node)}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers, + - * / and parentheses.

    Args:
        expression: The expression to evaluate, e.g. "3 * (4 + 5)".

    Returns:
        The value, as an integer when it is whole.
    """
    value = _evaluate(ast.parse(expression, mode="eval").body)
    return str(int(value)) if float(value).is_integer() else str(value)


def digits_dataset(n: int = 256, seed: int = 0) -> Dataset:
    """Short conversational prompts asking for a run of digits: the task of the stress test's tiny model.

    A randomly initialised model emits digits in a few percent of its characters, so `digit_share_reward` starts low
    and a tiny model learns it in tens of GRPO steps: a learnable signal in which a run can visibly improve or break.
    """
    rng = random.Random(seed)
    rows = [
        {"prompt": [{"role": "user", "content": f"Write the digits after {rng.randint(0, 99)}."}]} for _ in range(n)
    ]
    return Dataset.from_list(rows)


def digit_share_reward(completions, **kwargs) -> list[float]:
    """Share of the completion's non-space characters that are ASCII digits (0.0 for an empty completion)."""
    rewards = []
    for completion in completions:
        chars = [c for c in _text(completion) if not c.isspace()]
        rewards.append(sum(c in "0123456789" for c in chars) / len(chars) if chars else 0.0)
    return rewards


def running_sums_example(rng: random.Random, digits: int) -> tuple[str, str]:
    """One running-sums problem: ``("Running sums: 3 8 1 ...", "3 1 2 ...")``, the answer being the running sums of
    the digits mod 10."""
    values = [rng.randrange(10) for _ in range(digits)]
    sums, total = [], 0
    for value in values:
        total = (total + value) % 10
        sums.append(total)
    return "Running sums: " + " ".join(map(str, values)), " ".join(map(str, sums))


def running_sums_dataset(n: int = 256, seed: int = 0, digits: int = 64) -> Dataset:
    """`n` running-sums prompts of `digits` digits each: the task of the stress test's sharp policy
    (`trl_alp.experiments.sharp`). Columns ``prompt``, ``answer`` and ``digits`` (the prompt's digits, which
    `running_sums_reward` checks against)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, answer = running_sums_example(rng, digits)
        rows.append(
            {"prompt": [{"role": "user", "content": prompt}], "answer": answer, "digits": prompt.split(": ")[1]}
        )
    return Dataset.from_list(rows)


def running_sums_reward(completions, digits, **kwargs) -> list[float]:
    """The share of the running sums written right before the first error (1.0: all of them, nothing extra).

    Each completion is read as whitespace-separated tokens; position i must be the running sum mod 10 of the first
    i + 1 prompt digits. A wrong, missing or extra token ends the credit there, so one early slip costs more than a
    late one: the reward of a whole sequence, dense enough to learn from.
    """
    rewards = []
    for completion, given in zip(completions, digits, strict=True):
        values, total, expected = [int(d) for d in given.split()], 0, []
        for value in values:
            total = (total + value) % 10
            expected.append(str(total))
        written = _text(completion).split()
        right = 0
        for token, want in zip(written, expected):
            if token != want:
                break
            right += 1
        exact = right == len(expected) and len(written) == len(expected)
        rewards.append(1.0 if exact else min(right, len(expected) - 1) / len(expected))
    return rewards


# The rewards `trl-alp train --reward_funcs` knows by name.
REWARD_FUNCS = {
    "correctness": correctness_reward,
    "number_format": number_format_reward,
    "digit_share": digit_share_reward,
    "running_sums": running_sums_reward,
}

# The experiments' tasks: how to generate the prompts, and the rewards that verify the answers.
TASKS = {
    "addition": (addition_dataset, ("correctness", "number_format")),
    "arithmetic": (arithmetic_dataset, ("correctness", "number_format")),
    "digits": (digits_dataset, ("digit_share",)),
    "running-sums": (running_sums_dataset, ("running_sums",)),
    "running-sums-256": (functools.partial(running_sums_dataset, digits=256), ("running_sums",)),
    "running-sums-tiny": (functools.partial(running_sums_dataset, digits=6), ("running_sums",)),
}


def load_task(name: str, n: int, seed: int = 0) -> tuple[Dataset, list[Callable]]:
    """`n` prompts of the task `name` (one of `TASKS`) and its reward functions."""
    make_dataset, rewards = TASKS[name]
    return make_dataset(n, seed=seed), [REWARD_FUNCS[reward] for reward in rewards]

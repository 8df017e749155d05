"""Generated tasks are solvable as stated, and the verifiable rewards check what they claim."""

import re

from datasets import Dataset

from trl_alp.tasks import (
    addition_dataset,
    arithmetic_dataset,
    correctness_reward,
    gsm8k_to_prompts,
    last_number,
    number_format_reward,
)


def _solve(question: str) -> int:
    a, b = (int(x) for x in re.findall(r"\d+", question))
    if "+" in question or "buys" in question:
        return a + b
    if "-" in question or "left" in question:
        return a - b
    return a * b


def test_arithmetic_dataset_answers_are_correct_and_reproducible():
    data = arithmetic_dataset(64, seed=3)
    assert data.column_names == ["prompt", "answer"] and len(data) == 64
    for row in data:
        assert row["prompt"][0]["role"] == "system" and row["prompt"][1]["role"] == "user"
        assert int(row["answer"]) == _solve(row["prompt"][1]["content"]) >= 0
    assert arithmetic_dataset(64, seed=3)["answer"] == data["answer"]
    assert arithmetic_dataset(64, seed=4)["answer"] != data["answer"]


def test_addition_dataset_and_its_rewards():
    data = addition_dataset(64, seed=5)
    assert data.column_names == ["prompt", "answer"] and len(data) == 64
    for row in data:
        system, user = row["prompt"]
        assert system == {"role": "system", "content": "Reply with only the number."}
        a, b = (int(x) for x in re.fullmatch(r"What is (\d) \+ (\d)\?", user["content"]).groups())
        assert 1 <= a <= 9 and 1 <= b <= 9 and row["answer"] == str(a + b)
    assert addition_dataset(64, seed=5)["prompt"] == data["prompt"]
    assert addition_dataset(64, seed=6)["prompt"] != data["prompt"]
    # replies the way SmolLM2 writes them: bare, as an equation, cut off mid-detour, wrong, none
    replies = ["7", "3 + 4 = 7", "To add 3 and 4 we first", "3 + 4 = 8", "Seven."]
    completions = [[{"role": "assistant", "content": r}] for r in replies]
    assert correctness_reward(completions, answer=["7"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert number_format_reward(completions) == [0.2, 0.2, 0.2, 0.2, 0.0]  # the cut-off detour ends on "4"


def test_rewards():
    completions = [
        [{"role": "assistant", "content": "7 + 5 = 12"}],
        [{"role": "assistant", "content": "The answer is 1,200."}],
        [{"role": "assistant", "content": "twelve"}],
        "plain text 3",
    ]
    assert correctness_reward(completions, answer=["12", "1200", "12", "4"]) == [1.0, 1.0, 0.0, 0.0]
    assert number_format_reward(completions) == [0.2, 0.2, 0.0, 0.2]
    assert last_number("a -3.5 then 2") == "2" and last_number("none") is None


def test_gsm8k_mapping():
    raw = Dataset.from_list([{"question": "How many?", "answer": "Work... #### 1,234"}])
    row = gsm8k_to_prompts(raw)[0]
    assert row["answer"] == "1234" and row["prompt"][-1] == {"role": "user", "content": "How many?"}


def test_digits_task_and_reward():
    from trl_alp.tasks import digit_share_reward, digits_dataset

    data = digits_dataset(16, seed=1)
    assert len(data) == 16 and data[0]["prompt"][0]["role"] == "user"
    assert digits_dataset(16, seed=1)["prompt"] == data["prompt"]
    rewards = digit_share_reward([[{"role": "assistant", "content": t}] for t in ["12 34", "a1b2", "", "  ", "xyz"]])
    assert rewards == [1.0, 0.5, 0.0, 0.0, 0.0]


def test_load_task_pairs_each_task_with_the_rewards_that_verify_it():
    from trl_alp.tasks import digit_share_reward, digits_dataset, load_task

    data, rewards = load_task("digits", 8, seed=2)
    assert data["prompt"] == digits_dataset(8, seed=2)["prompt"] and rewards == [digit_share_reward]
    data, rewards = load_task("addition", 8, seed=2)
    assert data["answer"] == addition_dataset(8, seed=2)["answer"]
    assert rewards == [correctness_reward, number_format_reward]
    assert load_task("arithmetic", 4)[0]["answer"] == arithmetic_dataset(4)["answer"]

"""The "dyck" task: the prompt asks for a length L; the answer is a balanced ( ) [ ] string of length L.

The black-box teacher is a program writing a random balanced string, so teacher quality is exactly 1.0
and a student's validity rate is a ground-truth score the discriminator never sees.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence

MIN_LEN = 4
MAX_LEN = 24
# Balanced strings have even length, so only even L make answerable prompts.
LENGTHS = tuple(range(MIN_LEN, MAX_LEN + 1, 2))
PAIRS = {")": "(", "]": "["}
OPENERS = "(["
SYMBOLS = "()[]"
_PROMPT_RE = re.compile(r"^\s*(?:len\s+)?(\d+)\s*$")


def make_prompt(L: int) -> str:
    if L not in LENGTHS:
        raise ValueError(f"L must be even and in [{MIN_LEN}, {MAX_LEN}], got {L}")
    return f"len {L}"


def parse_prompt(prompt: str) -> int:
    """The length asked for by a prompt ("len 12" or "12")."""
    m = _PROMPT_RE.match(prompt)
    if not m:
        raise ValueError(f"not a dyck prompt: {prompt!r}")
    return int(m.group(1))


def teacher_response(L: int, rng: random.Random) -> str:
    """A random balanced string of exactly L symbols from ( ) [ ]."""
    make_prompt(L)  # validates L
    out: list[str] = []
    stack: list[str] = []
    for i in range(L):
        remaining = L - i
        # Open when nothing is open; close when every remaining slot is needed for closing.
        must_open = not stack
        must_close = len(stack) == remaining
        if must_open or (not must_close and rng.random() < 0.5):
            ch = rng.choice(OPENERS)
            stack.append(ch)
        else:
            ch = ")" if stack.pop() == "(" else "]"
        out.append(ch)
    return "".join(out)


def is_balanced(text: str) -> bool:
    stack: list[str] = []
    for ch in text:
        if ch in OPENERS:
            stack.append(ch)
        elif ch in PAIRS:
            if not stack or stack.pop() != PAIRS[ch]:
                return False
        else:
            return False
    return not stack


def is_valid(prompt: str, response_text: str) -> bool:
    """Valid iff the response is balanced and exactly as long as the prompt asks (no other chars)."""
    try:
        L = parse_prompt(prompt)
    except ValueError:
        return False
    return len(response_text) == L and is_balanced(response_text)


def compute_score(prompt: str, response: str) -> float:
    """The checker as a reward function (``custom_reward_function.path`` = this file, ``.name`` =
    ``compute_score``): 1.0 for a valid response, else 0.0. The demo's GAD stage logs it at weight 0,
    so D never trains on it but ``critic/verifier_auc`` shows whether D ranks valid samples first."""
    return float(is_valid(prompt, response))


def score_samples(prompts: Sequence[str], responses: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Scores samples; ``responses[i]`` is one string or the n samples of ``prompts[i]``.

    Returns valid_rate (share of all samples), distinct_valid_per_prompt (mean count of distinct
    valid samples per prompt) and distinct_valid_rate (that count over n, which catches collapse).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response groups")
    if not prompts:
        raise ValueError("score_samples needs at least one prompt")
    n_samples = n_valid = 0
    distinct_counts: list[int] = []
    distinct_rates: list[float] = []
    for prompt, group in zip(prompts, responses):
        group = [group] if isinstance(group, str) else list(group)
        valid = [r for r in group if is_valid(prompt, r)]
        n_samples += len(group)
        n_valid += len(valid)
        distinct_counts.append(len(set(valid)))
        distinct_rates.append(len(set(valid)) / len(group) if group else 0.0)
    return {
        "valid_rate": n_valid / n_samples if n_samples else 0.0,
        "distinct_valid_per_prompt": sum(distinct_counts) / len(prompts),
        "distinct_valid_rate": sum(distinct_rates) / len(prompts),
        "num_prompts": float(len(prompts)),
        "num_samples": float(n_samples),
    }


def write_dataset(out_dir: str | os.PathLike, n_train: int = 1000, n_heldout: int = 200,
                  seed: int = 0) -> dict[str, str]:
    """Writes train.jsonl and heldout.jsonl (columns content, teacher_response); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        path = os.path.join(str(out_dir), f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(n):
                L = rng.choice(LENGTHS)
                row = {"content": make_prompt(L), "teacher_response": teacher_response(L, rng)}
                f.write(json.dumps(row) + "\n")
        paths[split] = path
    return paths

"""The "brackets" task for the GAD vs SeqKD experiment (issue 23, item 4): long balanced strings, a teacher
with its own style whose exact log-probability is free, a checker, and an out-of-distribution family.

* In-distribution prompt ``len L`` (L even, 8..40): write a balanced ``( ) [ ]`` string of exactly L
  symbols. Long enough for exposure bias (a student off its own prefix distribution must still close
  every bracket), and hard for a tiny student to get exactly right (it has to count).
* Out-of-distribution prompt ``len L <prefix>`` (never in the distillation data): complete the prefix to
  a balanced string of total length L; the response is the completion only. Same skill, new context.
* Teacher: a program with a style (``Style``): it opens with probability ``p_open`` while it may, and picks
  the bracket type by the parity of the depth (``(`` at even depth with probability ``p_round_even``,
  ``[`` at odd depth likewise). A valid answer is not enough to match it: the discriminator can learn
  the style, and ``teacher_logprob`` gives the exact log-probability of any string (teacher NLL of the
  student's samples, or recall of held-out teacher strings) -- no sampling estimate.

Uses only the demo tokenizer's vocabulary (``demo/assets.py``: brackets, digits, space, ``len``).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass

from megatron_gad.demo.task import OPENERS, PAIRS, is_balanced

MIN_LEN, MAX_LEN = 8, 40
LENGTHS = tuple(range(MIN_LEN, MAX_LEN + 1, 2))
CLOSE_OF = {"(": ")", "[": "]"}
_PROMPT_RE = re.compile(r"^\s*len\s+(\d+)(?:\s+([()\[\]]+))?\s*$")


@dataclass(frozen=True)
class Style:
    p_open: float = 0.6  # open a bracket when both opening and closing are allowed
    p_round_even: float = 0.8  # "(" at even depth, "[" at odd depth, with this probability


def make_prompt(L: int, prefix: str = "") -> str:
    if L not in LENGTHS:
        raise ValueError(f"L must be even and in [{MIN_LEN}, {MAX_LEN}], got {L}")
    if prefix and (_stack(prefix) is None or len(prefix) >= L or len(_stack(prefix)) > L - len(prefix)):
        raise ValueError(f"prefix {prefix!r} cannot be completed to a balanced string of length {L}")
    return f"len {L}" + (f" {prefix}" if prefix else "")


def parse_prompt(prompt: str) -> tuple[int, str]:
    """(L, prefix) of a prompt; prefix "" for the in-distribution form."""
    m = _PROMPT_RE.match(prompt)
    if not m:
        raise ValueError(f"not a brackets prompt: {prompt!r}")
    return int(m.group(1)), m.group(2) or ""


def _stack(text: str) -> list[str] | None:
    """The open brackets after reading ``text`` (None: it closes something it should not)."""
    stack: list[str] = []
    for ch in text:
        if ch in OPENERS:
            stack.append(ch)
        elif ch in PAIRS and stack and stack[-1] == PAIRS[ch]:
            stack.pop()
        else:
            return None
    return stack


def _choices(stack: list[str], remaining: int, style: Style) -> dict[str, float]:
    """The teacher's next-symbol distribution given the open brackets and the symbols left to write."""
    can_open, can_close = len(stack) < remaining, bool(stack)
    out: dict[str, float] = {}
    p_open = 1.0 if not can_close else (0.0 if not can_open else style.p_open)
    if p_open > 0:
        first = "(" if len(stack) % 2 == 0 else "["
        other = "[" if first == "(" else "("
        out[first] = p_open * style.p_round_even
        out[other] = p_open * (1 - style.p_round_even)
    if p_open < 1:
        out[CLOSE_OF[stack[-1]]] = 1 - p_open
    return out


def teacher_response(L: int, rng: random.Random, style: Style = Style(), prefix: str = "") -> str:
    """The teacher's answer: the whole string, or with ``prefix`` its completion only."""
    make_prompt(L, prefix)
    stack = _stack(prefix)
    out: list[str] = []
    for i in range(len(prefix), L):
        probs = _choices(stack, L - i, style)
        r, acc, ch = rng.random(), 0.0, None
        for sym, p in probs.items():  # inverse-CDF draw; the last symbol if rounding leaves r above acc
            acc, ch = acc + p, sym
            if r < acc:
                break
        if ch in OPENERS:
            stack.append(ch)
        else:
            stack.pop()
        out.append(ch)
    return "".join(out)


def teacher_logprob(prompt: str, response: str, style: Style = Style()) -> float:
    """Exact log-probability that the teacher writes ``response`` for ``prompt`` (-inf if it never would,
    e.g. an invalid or wrong-length response)."""
    L, prefix = parse_prompt(prompt)
    stack = _stack(prefix)
    if stack is None or len(prefix) + len(response) != L:
        return -math.inf
    lp = 0.0
    for i, ch in enumerate(response):
        p = _choices(stack, L - len(prefix) - i, style).get(ch, 0.0)
        if p == 0.0:
            return -math.inf
        lp += math.log(p)
        if ch in OPENERS:
            stack.append(ch)
        else:
            stack.pop()
    return lp


def is_valid(prompt: str, response_text: str) -> bool:
    """Valid iff prefix + response is balanced and exactly L symbols long."""
    try:
        L, prefix = parse_prompt(prompt)
    except ValueError:
        return False
    return len(prefix) + len(response_text) == L and is_balanced(prefix + response_text)


def compute_score(prompt: str, response: str) -> float:
    """The checker as a reward function (``custom_reward_function``): 1.0 valid, else 0.0."""
    return float(is_valid(prompt, response))


def ood_prompt(rng: random.Random, style: Style = Style()) -> str:
    """A completion prompt: a prefix of a teacher string (between a quarter and three quarters of it)."""
    L = rng.choice(LENGTHS)
    full = teacher_response(L, rng, style)
    return make_prompt(L, full[:rng.randint(L // 4, 3 * L // 4)])


def write_dataset(out_dir: str | os.PathLike, n_train: int = 2000, n_val: int = 200, n_test: int = 400,
                  n_ood: int = 400, seed: int = 0, style: Style = Style()) -> dict[str, str]:
    """train / val / test (in-distribution, ``len L``) and ood_test (completions) as jsonl with columns
    ``content`` and ``teacher_response``; returns their paths. Splits use separate random streams."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for k, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test), ("ood_test", n_ood))):
        rng = random.Random(seed * 1_000_003 + k)
        path = os.path.join(str(out_dir), f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(n):
                prompt = ood_prompt(rng, style) if split == "ood_test" else make_prompt(rng.choice(LENGTHS))
                L, prefix = parse_prompt(prompt)
                row = {"content": prompt, "teacher_response": teacher_response(L, rng, style, prefix)}
                f.write(json.dumps(row) + "\n")
        paths[split] = path
    return paths

"""Hybrid reward: a task verifier given the verl way, mixed with the discriminator's score, and the
view that tells reward hacking from progress.

``custom_reward_function.path`` / ``.name`` name a Python file and a function in it (verl's keys).
The function gets one sample's texts and returns a float (or a dict with a ``score``, as verl's
reward functions may). Two signatures are accepted:

* ``fn(prompt, response)``: the prompt as written in the data file (the raw ``data.prompt_key``
  value: a string or a message list) and the decoded response (EOS and special tokens dropped);
* verl's ``fn(data_source, solution_str, ground_truth, extra_info=None)``, detected by a parameter
  named ``solution_str``: ``data_source``, ``ground_truth`` (``reward_model.ground_truth``, else a
  top-level ``ground_truth``) and ``extra_info`` come from the sample's data row.

Each GAD step the actor's reward is ``reward.critic_weight * D(student) + reward.verifier_weight *
verifier`` (verifier weight 0 = log only; critic weight 0 = the checker-only control), and
``critic/verifier_auc`` says how well D alone ranks the samples the verifier prefers above the others
(``algos.ranking_auc``). D's scores rising while that AUC sits below
``reward.hacking_auc`` means the student is learning what D rewards, not what the task asks:
:class:`HackingMonitor` warns.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_gad import algos
from megatron_gad.algos import ranking_auc
from megatron_gad.errors import InputError
from megatron_gad.metrics import trend_slope

log = logging.getLogger("megatron_gad")


def load_reward_function(path: str, name: str) -> Callable[..., Any]:
    """Import ``name`` from the Python file ``path`` (clear errors, no traceback, for the usual mistakes)."""
    where = f"custom_reward_function.path={path!r}"
    if not os.path.isfile(path):
        raise InputError(f"{where}: no such file")
    spec = importlib.util.spec_from_file_location(f"megatron_gad_custom_reward_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise InputError(f"{where}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's module failed to import: say where, keep the reason
        raise InputError(f"{where}: importing it failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise InputError(f"{where} has no function {name!r} (custom_reward_function.name); it defines: "
                         f"{', '.join(found) or 'nothing callable'}")
    return fn


def _ground_truth(row: dict) -> Any:
    rm = row.get("reward_model")
    if isinstance(rm, dict) and "ground_truth" in rm:
        return rm["ground_truth"]
    return row.get("ground_truth")


class Verifier:
    """Calls the reward function on one step's samples. ``rows[i]``: the raw data row of dataset item
    i (the dataset keeps them when a verifier is configured); ``prompt_key`` names the prompt in it."""

    def __init__(self, fn: Callable[..., Any], rows: Sequence[dict], prompt_key: str, name: str = ""):
        self.fn, self.rows, self.prompt_key = fn, rows, prompt_key
        self.name = name or getattr(fn, "__name__", "verifier")
        params = inspect.signature(fn).parameters
        self.verl_style = "solution_str" in params
        self.extra_info = "extra_info" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def _call(self, row: dict, response: str) -> float:
        if self.verl_style:
            kw = {"data_source": row.get("data_source"), "solution_str": response, "ground_truth": _ground_truth(row)}
            if self.extra_info:
                extra = row.get("extra_info")
                kw["extra_info"] = dict(extra, prompt=row.get(self.prompt_key)) if isinstance(extra, dict) \
                    else {"prompt": row.get(self.prompt_key)}
            out = self.fn(**kw)
        else:
            out = self.fn(row.get(self.prompt_key), response)
        if isinstance(out, dict):
            out = out.get("score")
        try:
            value = float(out)
        except (TypeError, ValueError):
            raise InputError(f"custom reward function {self.name!r} returned {out!r}; it must return a number "
                             "(or a dict with a numeric 'score')") from None
        if not math.isfinite(value):
            raise InputError(f"custom reward function {self.name!r} returned {value} for response {response[:80]!r}")
        return value

    def __call__(self, index: Sequence[int], responses: Sequence[str], n: int) -> torch.Tensor:
        """Scores [B*n] of ``responses`` (rows i*n .. i*n+n-1 answer dataset item ``index[i]``)."""
        if len(responses) != len(index) * n:
            raise ValueError(f"{len(responses)} responses for {len(index)} prompts x n={n}")
        return torch.tensor([self._call(self.rows[int(index[k // n])], text) for k, text in enumerate(responses)],
                            dtype=torch.float32)


class HackingMonitor:
    """Warns when D's reward rises while D's ranking of the verifier's good samples stays poor.

    Over the last ``window`` GAD steps: the mean ``critic/verifier_auc`` below ``threshold`` and the
    least-squares slope of the mean D score (the part of the reward D gives) above 0. The warning is
    logged when the condition starts and every ``window`` steps while it holds; the metric
    ``reward/hacking_warning`` is 1 on every step it holds."""

    def __init__(self, threshold: float = 0.55, window: int = 5):
        self.threshold, self.window = threshold, window
        self.auc: deque[float] = deque(maxlen=window)
        self.reward: deque[float] = deque(maxlen=window)
        self.held = 0  # consecutive steps the condition held

    def observe(self, auc: float | None, critic_reward_mean: float) -> dict:
        if auc is not None:
            self.auc.append(auc)
        self.reward.append(critic_reward_mean)
        out = {"reward/hacking_warning": 0.0}
        if len(self.auc) < self.window or len(self.reward) < self.window:
            self.held = 0
            return out
        mean_auc = sum(self.auc) / len(self.auc)
        slope = trend_slope(list(enumerate(self.reward)))  # per step; a full window has >= 2 points
        if mean_auc < self.threshold and slope > 0:
            if self.held % self.window == 0:
                log.warning("possible reward hacking: the critic's reward rises (%+.3g per step over the last %d "
                            "steps) while it ranks the verifier's good samples no better than chance "
                            "(critic/verifier_auc %.2f < %.2f); see docs/discriminator.md", slope, self.window,
                            mean_auc, self.threshold)
            self.held += 1
            out["reward/hacking_warning"] = 1.0
        else:
            self.held = 0
        return out

    def state_dict(self) -> dict:
        return {"auc": list(self.auc), "reward": list(self.reward), "held": self.held}

    def load_state_dict(self, state: dict) -> None:
        self.auc.clear()
        self.auc.extend(state["auc"])
        self.reward.clear()
        self.reward.extend(state["reward"])
        self.held = int(state["held"])


VERIFIER_ROW_KEYS = ("data_source", "reward_model", "ground_truth", "extra_info")


def verifier_row_keys(cfg) -> tuple[str, ...]:
    """The data-row fields the dataset must keep for the configured verifier (none without one)."""
    if cfg.custom_reward_function.path is None or cfg.trainer.mode != "gad":
        return ()
    return (cfg.data.prompt_key, *VERIFIER_ROW_KEYS)


class HybridReward:
    """One GAD step's reward [B*n] = D + ``reward.verifier_weight`` * verifier, and its metrics.
    Built by the trainer from ``cfg.custom_reward_function`` / ``cfg.reward`` and its dataset."""

    def __init__(self, cfg, rows: Sequence[dict]):
        crf, r = cfg.custom_reward_function, cfg.reward
        self.verifier = Verifier(load_reward_function(crf.path, crf.name), rows, cfg.data.prompt_key, crf.name)
        self.monitor = HackingMonitor(r.hacking_auc, r.hacking_window)
        self.weight = r.verifier_weight
        self.critic_weight = r.critic_weight  # 0: the checker-only control (the actor never sees D)
        log.info("verifier %s from %s: reward = %g * D + %g * verifier%s", crf.name, crf.path, self.critic_weight,
                 self.weight, " (logged only)" if self.weight == 0 else "")

    def __call__(self, index: Sequence[int], texts: Sequence[str], critic_scores: torch.Tensor,
                 n: int) -> tuple[torch.Tensor, dict]:
        v = self.verifier(index, texts, n)
        auc = ranking_auc(critic_scores, v)
        m = {"reward/verifier_mean": float(v.mean()), "reward/critic_mean": float(critic_scores.float().mean())}
        if auc is not None:
            m["critic/verifier_auc"] = auc
        m.update(self.monitor.observe(auc, m["reward/critic_mean"]))
        return algos.mix_rewards(critic_scores, self.critic_weight, v, self.weight), m

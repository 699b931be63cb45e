"""``megatron-gad logprobs``: per-token log-probs of each row's response under an actor, at TP x PP.

The parent process validates MODEL and the data file and tokenizes every row exactly like training
(:func:`megatron_gad.data.encode_prompt` / :func:`~megatron_gad.data.encode_teacher_response`: chat
template for prompts when the tokenizer has one, responses ending with exactly one EOS); TP*PP
spawned ranks build an :class:`~megatron_gad.workers.actor.ActorWorker` and run its packed
``compute_log_prob`` — the pass training uses for the PPO "old" log-probs — over batches of rows.

This module also holds what ``megatron-gad score`` shares with it: reading rows, the worker
configs, batching rows into the workers' padded layout, the launch, and the output.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

from megatron_gad.tools import ToolError, log, stdout_to_stderr


@dataclass(frozen=True)
class PassJob:
    """One model pass over token-id rows (unpadded ``prompts[i]`` ++ ``responses[i]``) on TP*PP ranks."""

    model: str
    prompts: list[list[int]]
    responses: list[list[int]]
    eos_id: int
    pad_id: int
    tp: int = 1
    pp: int = 1
    vocab_divisible_by: int = 128
    params_dtype: str = "float32"
    batch_size: int = 8  # rows per worker call (one packed micro-batch)
    temperature: float = 1.0  # log-probs of softmax(logits / T)
    score_pooling: str = "last"  # critic.score_pooling of the scoring pass


# ---------------------------------------------------------------- per-rank bodies
def _megatron_config(job: PassJob):
    from megatron_gad.config import MegatronConfig

    return MegatronConfig(tensor_model_parallel_size=job.tp, pipeline_model_parallel_size=job.pp,
                          params_dtype=job.params_dtype)


def actor_config(job: PassJob):
    """The ``actor_rollout_ref`` section for a frozen log-prob pass over ``job``."""
    from megatron_gad.config import ActorRolloutRefConfig

    base = ActorRolloutRefConfig()
    return replace(base, model=replace(base.model, path=job.model, make_vocab_size_divisible_by=job.vocab_divisible_by),
                   actor=replace(base.actor, megatron=_megatron_config(job)),
                   rollout=replace(base.rollout, log_prob_micro_batch_size_per_gpu=job.batch_size,
                                   temperature=job.temperature))


def critic_config(job: PassJob):
    """The ``critic`` section for a scoring pass over ``job`` (the torch head: scoring needs no fused loss)."""
    from megatron_gad.config import CriticConfig

    base = CriticConfig()
    return replace(base, model=replace(base.model, path=job.model), megatron=_megatron_config(job),
                   forward_micro_batch_size_per_gpu=job.batch_size, fused_loss="torch", score_pooling=job.score_pooling)


def run_batches(job: PassJob, method, key: str) -> list | None:
    """Call the worker ``method`` (a registered ``Dispatch.DP`` pass) on ``job``'s rows, ``batch_size``
    at a time, in the workers' layout (left-padded prompts, right-padded responses). The collector
    rank returns one result per row (``result[key]`` row, unpadded for [B, R] results); others None."""
    from megatron_gad.data import pad_sequences

    out: list | None = []
    for i in range(0, len(job.prompts), job.batch_size):
        prompts, responses = job.prompts[i:i + job.batch_size], job.responses[i:i + job.batch_size]
        prompt_ids, prompt_mask = pad_sequences(prompts, job.pad_id, left=True)
        resp, resp_mask = pad_sequences(responses, job.pad_id, left=False)
        res = method({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "responses": resp,
                      "response_mask": resp_mask})
        if res is None:  # not the collector rank
            out = None
            continue
        values = res[key]
        out += [values[k, :len(r)].tolist() if values.dim() > 1 else float(values[k])
                for k, r in enumerate(responses)]
    return out


def logprobs_on_rank(job: PassJob) -> list[list[float]] | None:
    """Inside a launched rank: each row's per-token response log-probs (collector rank; None elsewhere)."""
    from megatron_gad.workers.actor import ActorWorker

    worker = ActorWorker(actor_config(job), max_response_length=max(len(r) for r in job.responses),
                         total_steps=0, eos_id=job.eos_id, pad_id=job.pad_id)
    return run_batches(job, worker.compute_log_prob, "log_prob")


def _logprobs_rank(rank: int, world: int, job: PassJob):
    stdout_to_stderr()
    return logprobs_on_rank(job)


def launch(rank_fn, job: PassJob) -> list:
    """Run ``rank_fn(rank, world, job)`` on TP*PP local ranks; the collector rank's per-row results."""
    from megatron_gad.parallel.launch import run_local

    results = [r for r in run_local(rank_fn, job.tp * job.pp, job) if r is not None]
    if len(results) != 1:
        raise RuntimeError(f"distributed run returned {len(results)} collector results, expected 1")
    return results[0]


# ---------------------------------------------------------------- parent side: inputs
@dataclass
class Rows:
    """Tokenized rows of a data file: ``responses[key][i]`` is row i's ids of column ``key`` (None
    where an optional column is absent)."""

    prompts: list[list[int]]
    responses: dict[str, list[list[int] | None]]


def read_rows(path: str, tok, prompt_key: str, response_key: str, optional_key: str | None = None) -> Rows:
    """Validate and tokenize ``path`` like training does (``GADDataset``'s row checks, its prompt
    template and EOS policy). ``optional_key``: a second response column that rows may omit (or set
    to null), tokenized with the same EOS policy. Any problem is a ToolError naming file:line."""
    from megatron_gad.data import (
        BadRow,
        DataError,
        check_row,
        encode_prompt,
        encode_teacher_response,
        iter_file,
        no_eos_message,
    )

    if not os.path.exists(path):
        raise ToolError(f"--data {path}: no such file")
    if not os.path.isfile(path):
        raise ToolError(f"--data {path}: not a file")
    if tok.eos_token_id is None:
        raise ToolError(no_eos_message(tok))  # the training message: responses end with EOS here too
    rows = Rows([], {response_key: []} | ({optional_key: []} if optional_key else {}))
    keys = (prompt_key, response_key) + ((optional_key,) if optional_key else ())
    try:
        for loc, row in iter_file(path, keys):
            try:
                prompt, text = check_row(row, prompt_key, response_key)
                rows.prompts.append(encode_prompt(tok, prompt))
                rows.responses[response_key].append(encode_teacher_response(tok, text))
                if optional_key:
                    other = row.get(optional_key)
                    if other is not None and not (isinstance(other, str) and other.strip()):
                        raise BadRow("bad_type", f"'{optional_key}' must be a non-empty string or absent, "
                                                  f"got {other!r:.40}")
                    rows.responses[optional_key].append(encode_teacher_response(tok, other) if other else None)
            except BadRow as bad:
                raise ToolError(f"{loc}: {bad.problem}") from None
    except DataError as e:
        raise ToolError(str(e)) from None
    except OSError as e:
        raise ToolError(f"--data {path}: {e.strerror or e}") from None
    if not rows.prompts:
        raise ToolError(f"--data {path}: no rows")
    return rows


def prepare(args, command: str) -> tuple[dict, Rows, dict]:
    """Checks shared by ``logprobs`` and ``score``: MODEL, layout, tokenizer, data. Returns
    (hf_config, rows, PassJob keyword arguments other than the token ids)."""
    from megatron_gad.tools.generate import load_tokenizer, model_settings, special_ids

    cfg, vdb, dtype = model_settings(args.model, args.tp, args.pp, 128, command=command)
    tok = load_tokenizer(args.model, required=True, hint="the data rows are text and need the model's tokenizer")
    rows = read_rows(args.data, tok, args.prompt_key, args.response_key, getattr(args, "student_key", None))
    vocab = cfg["vocab_size"]
    for ids in (*rows.prompts, *(r for col in rows.responses.values() for r in col if r)):
        if max(ids) >= vocab or min(ids) < 0:
            raise ToolError(f"the tokenizer of {args.model} gives token ids outside the model's vocabulary "
                            f"[0, {vocab})")
    eos, pad = special_ids(cfg, tok, None)
    return cfg, rows, {"model": args.model, "eos_id": eos, "pad_id": pad, "tp": args.tp, "pp": args.pp,
                       "vocab_divisible_by": vdb, "params_dtype": dtype, "batch_size": args.batch_size}


# ---------------------------------------------------------------- parent side: output
def emit(records: list[dict], summary: dict, as_json: bool, table) -> None:
    """``--json``: one JSON line per row, then the summary line (stdout). Else ``table(records,
    summary)``'s lines."""
    lines = [json.dumps(r) for r in [*records, {"summary": True, **summary}]] if as_json else table(records, summary)
    print("\n".join(lines), flush=True)


def logprobs_records(rows: Rows, key: str, logprobs: list[list[float]]) -> tuple[list[dict], dict]:
    records = []
    for i, (p, r, lp) in enumerate(zip(rows.prompts, rows.responses[key], logprobs)):
        total = math.fsum(lp)
        records.append({"row": i, "prompt_ids": p, "response_ids": r, "logprobs": lp, "sum": total,
                        "mean": total / len(lp)})
    tokens = sum(len(lp) for lp in logprobs)
    nll = -math.fsum(rec["sum"] for rec in records) / tokens
    return records, {"rows": len(records), "tokens": tokens, "nll_per_token": nll, "perplexity": math.exp(nll)}


def logprobs_table(records: list[dict], summary: dict) -> list[str]:
    lines = [f"{'row':>5} {'prompt':>7} {'response':>8} {'sum':>12} {'mean':>10} {'ppl':>10}"]
    lines += [f"{r['row']:>5} {len(r['prompt_ids']):>7} {len(r['response_ids']):>8} {r['sum']:>12.4f} "
              f"{r['mean']:>10.4f} {math.exp(-r['mean']):>10.3f}" for r in records]
    lines.append(f"rows {summary['rows']}, response tokens {summary['tokens']}, "
                 f"NLL/token {summary['nll_per_token']:.4f}, perplexity {summary['perplexity']:.3f}")
    return lines


def main_logprobs(args) -> int:
    _, rows, settings = prepare(args, "logprobs")
    if args.temperature <= 0:
        raise ToolError(f"--temperature must be > 0, got {args.temperature}")
    job = PassJob(prompts=rows.prompts, responses=rows.responses[args.response_key], temperature=args.temperature,
                  **settings)
    log(f"logprobs: {len(job.prompts)} rows ({sum(map(len, job.responses))} response tokens) from {args.data}, "
        f"TP={args.tp} PP={args.pp}; launching {args.tp * args.pp} rank(s)")
    records, summary = logprobs_records(rows, args.response_key, launch(_logprobs_rank, job))
    emit(records, summary, args.json, logprobs_table)
    return 0

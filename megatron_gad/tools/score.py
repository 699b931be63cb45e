"""``megatron-gad score``: discriminator scores of teacher (and student) responses, at TP x PP.

Rows are read and tokenized like ``logprobs`` (and training): both the teacher response and the
optional ``student_response`` end with exactly one EOS, as the student samples training scores do.
TP*PP spawned ranks build a :class:`~megatron_gad.workers.critic.CriticWorker` from the critic
checkpoint and run its packed ``compute_scores`` (each sequence scored at its own last token, or
with ``--pooling mean`` averaged over its response: the reward pass of training). ``d_acc`` over
rows with both responses is :func:`megatron_gad.algos.discriminator_loss`'s (teacher above
student; exact ties count half).
"""

from __future__ import annotations

from megatron_gad.tools import log, stdout_to_stderr
from megatron_gad.tools.logprobs import PassJob, Rows, critic_config, emit, launch, prepare, run_batches


def scores_on_rank(job: PassJob) -> list[float] | None:
    """Inside a launched rank: D(prompt ++ response) of each row (collector rank; None elsewhere)."""
    from megatron_gad.workers.critic import CriticWorker

    worker = CriticWorker(critic_config(job), model_path=job.model, vocab_divisible_by=job.vocab_divisible_by,
                          total_steps=0, eos_id=job.eos_id)
    return run_batches(job, worker.compute_scores, "scores")


def _score_rank(rank: int, world: int, job: PassJob):
    stdout_to_stderr()
    return scores_on_rank(job)


def score_records(rows: Rows, teacher_key: str, student_key: str, scores: list[float]) -> tuple[list[dict], dict]:
    """Per-row records and the summary from the flat scores (teachers in row order, then the students
    of the rows that have one)."""
    import torch

    from megatron_gad.algos import discriminator_loss

    teachers, students = rows.responses[teacher_key], rows.responses[student_key]
    t_scores, s_iter = scores[:len(teachers)], iter(scores[len(teachers):])
    records = []
    for i, (p, t, s, ts) in enumerate(zip(rows.prompts, teachers, students, t_scores)):
        records.append({"row": i, "prompt_ids": p, "teacher_response_ids": t, "teacher_score": ts,
                        "student_response_ids": s, "student_score": next(s_iter) if s is not None else None})
    pairs = [(r["teacher_score"], r["student_score"]) for r in records if r["student_score"] is not None]
    summary = {"rows": len(records), "teacher_score_mean": sum(t_scores) / len(t_scores), "pairs": len(pairs),
               "student_score_mean": None, "d_acc": None, "d_loss": None}
    if pairs:
        t, s = (torch.tensor(col, dtype=torch.float64) for col in zip(*pairs))
        _, m = discriminator_loss(s, t, n=1)
        # d_acc counted exactly (the loss's metric is a float32 mean): teacher above student, ties half
        d_acc = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
        summary.update(student_score_mean=float(s.mean()), d_acc=d_acc, d_loss=float(m["d_loss"]))
    return records, summary


def score_table(records: list[dict], summary: dict) -> list[str]:
    def num(x):
        return f"{x:>12.5f}" if x is not None else f"{'-':>12}"

    verdict = {True: "teacher", False: "student"}
    lines = [f"{'row':>5} {'teacher':>12} {'student':>12}  higher"]
    for r in records:
        t, s = r["teacher_score"], r["student_score"]
        higher = "-" if s is None else ("tie" if t == s else verdict[t > s])
        lines.append(f"{r['row']:>5} {num(t)} {num(s)}  {higher}")
    line = f"rows {summary['rows']}, teacher score mean {summary['teacher_score_mean']:.5f}"
    if summary["pairs"]:
        line += (f"; {summary['pairs']} with a student response: student score mean "
                 f"{summary['student_score_mean']:.5f}, d_acc {summary['d_acc']:.4f}, d_loss {summary['d_loss']:.4f}")
    else:
        line += "; no row has a student response (no d_acc)"
    return [*lines, line]


def main_score(args) -> int:
    _, rows, settings = prepare(args, "score")
    teachers, students = rows.responses[args.response_key], rows.responses[args.student_key]
    have = [i for i, s in enumerate(students) if s is not None]
    job = PassJob(prompts=rows.prompts + [rows.prompts[i] for i in have],
                  responses=teachers + [students[i] for i in have], score_pooling=args.pooling, **settings)
    log(f"score: {len(teachers)} rows, {len(have)} with '{args.student_key}', from {args.data}, "
        f"TP={args.tp} PP={args.pp}; launching {args.tp * args.pp} rank(s)")
    records, summary = score_records(rows, args.response_key, args.student_key, launch(_score_rank, job))
    emit(records, summary, args.json, score_table)
    return 0

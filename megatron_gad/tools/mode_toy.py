"""The GAD paper's Fig. 5 toy, built from the project's own pure functions (``megatron_gad.algos``):
does GAD seek a mode where SFT (maximum likelihood) covers both?

* Teacher: a bimodal distribution on a 1-D grid (two well-separated Gaussian bumps, equal weight).
* Student: a discretised Gaussian on the same grid (parameters: mean, log-std): it cannot represent
  two modes, so the best it can do is a compromise -- and which compromise depends on the objective.
* SFT: maximum likelihood on teacher samples (``algos.sft_loss``) = forward KL(teacher || student):
  mass-covering, a wide Gaussian over both modes.
* GAD: a learned discriminator (a table of scores over the grid) trained with the pair loss
  (``algos.discriminator_loss``: the paper's BCE ablation by default, or Bradley-Terry), the student
  trained on its scores with GRPO advantages (``algos.compute_grpo_advantages``) and PPO-clip
  (``algos.ppo_policy_loss``), each sample a one-token response, after a frozen-student
  discriminator warmup (the project's recipe).

The saddle: a student centred on the teacher's centre of symmetry gets a zero expected policy
gradient on its mean from any symmetric reward; only sampling noise would pick a side, slowly and
differently per seed. The toy breaks the symmetry on purpose: SFT and GAD both start from a narrow
student (as wide as one teacher mode) whose mean is moved by ``offset`` (a fraction of the distance
to a mode) towards a side drawn from the seed. GAD should move to that side's mode: reverse
KL(student || teacher) below SFT's and forward KL above SFT's (it gives up the other mode). Not from
the SFT solution: there even exact reverse-KL descent stays covering (docs/mode-toy.md).

``python -m megatron_gad.tools.mode_toy`` prints the per-seed table (about 15 s of one CPU core); results and
what it took to get them: docs/mode-toy.md.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from megatron_gad import algos


@dataclass(frozen=True)
class ToyConfig:
    grid: int = 161  # points on [-span, span]: wide enough that the grid's edges do not shape the fits
    span: float = 8.0
    modes: float = 2.0  # the teacher's bumps at -modes and +modes
    mode_std: float = 0.5
    groups: int = 16  # "prompts" per step (one unconditional prompt, repeated)
    n: int = 8  # samples per group
    warmup_steps: int = 50  # discriminator-only steps (student frozen)
    gad_steps: int = 600
    # two timescales: the discriminator must track the student (critic lr 20x the actor's, one PPO
    # epoch); a faster actor outruns it and collapses to a point (docs/mode-toy.md)
    actor_lr: float = 0.01
    critic_lr: float = 0.2
    ppo_epochs: int = 1
    clip: float = 0.2
    offset: float = 0.1  # the start's mean moved by offset * modes towards the seed's side
    start_std: float = 0.5  # the student before distillation: narrow (as wide as one teacher mode)
    sft_steps: int = 150
    sft_lr: float = 0.1
    loss_type: str = "bce"  # the discriminator's loss: bce (its optimum is log q/p) | bt
    critic_shape: str = "score"  # the actor's reward: score | sigmoid_gap


def grid(c: ToyConfig) -> torch.Tensor:
    return torch.linspace(-c.span, c.span, c.grid, dtype=torch.float64)


def teacher_probs(c: ToyConfig) -> torch.Tensor:
    x = grid(c)
    bump = lambda m: torch.exp(-0.5 * ((x - m) / c.mode_std) ** 2)
    p = bump(-c.modes) + bump(c.modes)
    return p / p.sum()


def student_logprobs(c: ToyConfig, theta: torch.Tensor) -> torch.Tensor:
    """log p over the grid of the discretised Gaussian theta = (mean, log_std)."""
    x = grid(c).to(theta.dtype)
    logits = -0.5 * ((x - theta[0]) / theta[1].exp()) ** 2
    return torch.log_softmax(logits, 0)


def kls(c: ToyConfig, theta: torch.Tensor) -> tuple[float, float]:
    """(reverse KL(student || teacher), forward KL(teacher || student)), exact over the grid."""
    with torch.no_grad():
        lp = student_logprobs(c, theta.double())
        lq = teacher_probs(c).log()
        p, q = lp.exp(), lq.exp()
        return float((p * (lp - lq)).sum()), float((q * (lq - lp)).sum())


def sft(c: ToyConfig, seed: int, start: torch.Tensor) -> torch.Tensor:
    """Maximum likelihood on teacher samples: the mean of the teacher tokens' NLL (algos.sft_loss)."""
    g = torch.Generator().manual_seed(seed)
    theta = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=c.sft_lr)
    q = teacher_probs(c)
    for _ in range(c.sft_steps):
        idx = torch.multinomial(q, c.groups * c.n, replacement=True, generator=g)
        lp = student_logprobs(c, theta)[idx][:, None]  # [B, T=1]
        loss, _ = algos.sft_loss(lp, torch.ones_like(lp))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return theta.detach()


def gad(c: ToyConfig, start: torch.Tensor, seed: int, trace: list | None = None) -> torch.Tensor:
    """Frozen-student discriminator warmup, then GAD: GRPO + PPO-clip on the discriminator's reward."""
    g = torch.Generator().manual_seed(10_000 + seed)
    theta = start.clone().requires_grad_(True)
    d = torch.zeros(c.grid, dtype=torch.float64, requires_grad=True)  # D(x): one score per grid point
    opt_a = torch.optim.Adam([theta], lr=c.actor_lr)
    opt_d = torch.optim.Adam([d], lr=c.critic_lr)
    q = teacher_probs(c)
    controls = {"loss_type": c.loss_type} if c.loss_type != "bt" else {}
    shape = algos.get_critic_shape(c.critic_shape)
    N = c.groups * c.n
    for step in range(c.warmup_steps + c.gad_steps):
        with torch.no_grad():
            old_lp_all = student_logprobs(c, theta)
            x = torch.multinomial(old_lp_all.exp(), N, replacement=True, generator=g)  # rollout, [N]
        y = torch.multinomial(q, c.groups, replacement=True, generator=g)  # one teacher sample per prompt
        if step >= c.warmup_steps:  # reward from D before its update (the trainer's order)
            with torch.no_grad():
                reward = shape(d[x], d[y], c.n)
            mask = torch.ones(N, 1, dtype=torch.float64)
            adv, _ = algos.compute_grpo_advantages(reward, mask, c.n)
            old = old_lp_all[x][:, None]
        loss_d, _ = algos.discriminator_loss(d[x], d[y], c.n, **controls)  # the critic, every step
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        if step < c.warmup_steps:
            continue
        for _ in range(c.ppo_epochs):  # the actor: PPO-clip on the GRPO advantages
            lp = student_logprobs(c, theta)[x][:, None]
            loss, _ = algos.ppo_policy_loss(old, lp, adv, mask, clip_ratio_low=c.clip, clip_ratio_high=c.clip)
            opt_a.zero_grad()
            loss.backward()
            opt_a.step()
        if trace is not None:
            trace.append((step, float(theta[0]), float(theta[1].exp()), *kls(c, theta)))
    return theta.detach()


def start_of(c: ToyConfig, seed: int) -> tuple[torch.Tensor, int]:
    """The student before distillation: a narrow Gaussian between the modes, its mean moved off the
    centre by offset * modes to a side (+1 or -1) drawn from the seed."""
    side = 1 if torch.rand((), generator=torch.Generator().manual_seed(20_000 + seed)) < 0.5 else -1
    return torch.tensor([side * c.offset * c.modes, math.log(c.start_std)], dtype=torch.float64), side


def run_seed(c: ToyConfig, seed: int) -> dict:
    start, side = start_of(c, seed)
    s = sft(c, seed, start)
    t = gad(c, start, seed)
    rk_s, fk_s = kls(c, s)
    rk_g, fk_g = kls(c, t)
    return {"seed": seed, "side": side, "sft_mean": float(s[0]), "sft_std": math.exp(float(s[1])),
            "gad_mean": float(t[0]), "gad_std": math.exp(float(t[1])), "sft_reverse_kl": rk_s,
            "gad_reverse_kl": rk_g, "sft_forward_kl": fk_s, "gad_forward_kl": fk_g}


def markdown(rows: list[dict]) -> str:
    lines = ["| seed | side | SFT mean / std | GAD mean / std | reverse KL SFT | reverse KL GAD | forward KL SFT "
             "| forward KL GAD |", "|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['side']:+d} | {r['sft_mean']:+.2f} / {r['sft_std']:.2f} | "
                     f"{r['gad_mean']:+.2f} / {r['gad_std']:.2f} | {r['sft_reverse_kl']:.3f} | "
                     f"{r['gad_reverse_kl']:.3f} | {r['sft_forward_kl']:.3f} | {r['gad_forward_kl']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--loss-type", default=ToyConfig.loss_type, choices=["bt", "bce"])
    p.add_argument("--critic-shape", default="score", choices=["score", "sigmoid_gap"])
    p.add_argument("--offset", type=float, default=ToyConfig.offset)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    c = ToyConfig(loss_type=args.loss_type, critic_shape=args.critic_shape, offset=args.offset)
    print(markdown([run_seed(c, s) for s in range(args.seeds)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""critic.eos_policy: a student sample whose response ids equal its teacher's gets the teacher's
score — bitwise when both are in one forward pass, within 1e-6 across batch compositions and
packings — while ``none`` (the teacher's EOS dropped, the student's kept: the failure users of
verl ports hit) shows a gap."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.distributed

EOS, PAD, N = 2, 0, 3


def _batch():
    g = torch.Generator().manual_seed(0)
    B, P, R = 3, 6, 7
    prompt_ids = torch.randint(3, 90, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    teacher = torch.full((B, R), PAD)
    t_mask = torch.zeros(B, R, dtype=torch.long)
    for b, n_tok in enumerate((4, 6, 3)):  # text tokens, then the one EOS the data pipeline appends
        teacher[b, :n_tok] = torch.randint(3, 90, (n_tok,), generator=g)
        teacher[b, n_tok] = EOS
        t_mask[b, :n_tok + 1] = 1
    students = torch.full((B, N, R), PAD)
    s_mask = torch.zeros(B, N, R, dtype=torch.long)
    for b in range(B):
        for j in range(N):
            n_tok = int(torch.randint(2, R, (1,), generator=g))
            students[b, j, :n_tok] = torch.randint(3, 90, (n_tok,), generator=g)
            s_mask[b, j, :n_tok] = 1
            if j == 2:  # ends with a sampled EOS
                students[b, j, n_tok - 1] = EOS
    for b, j in ((0, 1), (2, 0)):  # the student wrote exactly the teacher's answer (EOS included)
        students[b, j], s_mask[b, j] = teacher[b], t_mask[b]
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "teacher_response": teacher,
            "teacher_response_mask": t_mask, "responses": students, "response_mask": s_mask}


def _run(rank, world, path, pooling):
    from dataclasses import replace

    from megatron_gad.config import CriticConfig
    from megatron_gad.workers.critic import CriticWorker

    batch = _batch()
    out = {}
    for policy in ("append", "strip", "none"):
        for mbs in (1, 3):  # pairs of one prompt per micro-batch, or all three packed together
            cfg = replace(CriticConfig(), eos_policy=policy, head_init_std=0.5, fused_loss="torch",
                          ppo_micro_batch_size_per_gpu=mbs, forward_micro_batch_size_per_gpu=mbs * 4,
                          score_pooling=pooling)
            w = CriticWorker(cfg, model_path=path, vocab_divisible_by=8, total_steps=1, eos_id=EOS)
            out[policy, mbs] = w.evaluate_pairs(batch, N)
        # scores of the identical rows through the reward path: alone, and inside a mixed batch
        rows = lambda b, j, resp, mask: {"prompt_ids": batch["prompt_ids"][b:b + 1],
                                         "prompt_mask": batch["prompt_mask"][b:b + 1],
                                         "responses": resp[None], "response_mask": mask[None]}
        student = rows(0, 1, batch["responses"][0, 1], batch["response_mask"][0, 1])
        teacher = rows(0, 1, batch["teacher_response"][0], batch["teacher_response_mask"][0])
        mixed = {"prompt_ids": batch["prompt_ids"].repeat_interleave(N, 0),
                 "prompt_mask": batch["prompt_mask"].repeat_interleave(N, 0),
                 "responses": batch["responses"].flatten(0, 1), "response_mask": batch["response_mask"].flatten(0, 1)}
        out[policy, "alone_student"] = w.compute_scores(student)["scores"]
        out[policy, "alone_teacher"] = w.compute_scores(teacher, side="teacher")["scores"]
        out[policy, "mixed"] = w.compute_scores(mixed)["scores"]  # row 1 is student (0, 1)
        # the teacher row and the student's copy in one pass of 5 rows, the copy last (a CPU GEMV
        # computes the rows left over after its 4-row blocks another way: the last bit could differ)
        one = {k: torch.cat([teacher[k], mixed[k][3:6], student[k]]) for k in teacher}
        out[policy, "one_pass"] = w.compute_scores(one)["scores"]
    out["head"] = [t.detach().clone() for t in w._head()]
    return out


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_same_tokens_same_score(tmp_path, pooling):
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    path = make_hf_model(str(tmp_path / "m"), "llama", seed=4)
    (out,) = run_local(_run, 1, path, pooling)
    for mbs in (1, 3):
        append = out["append", mbs]
        assert append["val/identical_pairs"] == pytest.approx(2 / 9)
        assert append["val/identical_pair_gap"] == 0.0  # bitwise equal scores in one forward pass
        strip = out["strip", mbs]
        assert strip["val/identical_pair_gap"] == 0.0
        none = out["none", mbs]
        assert none["val/identical_pairs"] == 0.0  # the texts are equal, the scored ids are not
        assert append["val/eos_mismatch"] == pytest.approx(1 - 5 / 9)  # 3 EOS students + 2 copies match
        assert none["val/eos_mismatch"] == pytest.approx(5 / 9)
    for policy in ("append", "strip"):
        alone_s, alone_t = float(out[policy, "alone_student"][0]), float(out[policy, "alone_teacher"][0])
        assert abs(alone_s - alone_t) <= 1e-6
        assert abs(float(out[policy, "mixed"][1]) - alone_s) <= 1e-6  # other rows packed alongside
        one = out[policy, "one_pass"]
        assert one[0].item() == one[4].item()  # bitwise in one forward pass
    # against transformers: the backbone's final-norm hidden states of the unpadded sequence, read at the
    # last token or averaged over the response tokens, through the critic's head
    from transformers import AutoModelForCausalLM

    b = _batch()
    prompt = b["prompt_ids"][0][b["prompt_mask"][0].bool()]
    resp = b["teacher_response"][0][b["teacher_response_mask"][0].bool()]  # "append": scored as is
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        h = model(torch.cat([prompt, resp])[None], output_hidden_states=True).hidden_states[-1][0].double()
    w, bias = (t.double() for t in out["head"])
    pooled = h[-len(resp):].mean(0) if pooling == "mean" else h[-1]
    want = float(pooled @ w.reshape(-1) + bias)
    assert abs(float(out["append", "alone_teacher"][0]) - want) <= 1e-5, (out["append", "alone_teacher"], want)
    # the users' failure: same text, different score
    gap = abs(float(out["none", "alone_student"][0]) - float(out["none", "alone_teacher"][0]))
    assert gap > 1e-3, gap

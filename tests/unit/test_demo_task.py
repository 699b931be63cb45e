import json
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_gad.data import GADDataset
from megatron_gad.demo import assets, task


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return assets.build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_teacher_outputs_are_always_valid():
    rng = random.Random(0)
    for L in task.LENGTHS:
        for _ in range(50):
            text = task.teacher_response(L, rng)
            assert len(text) == L and set(text) <= set("()[]")
            assert task.is_valid(task.make_prompt(L), text)


def test_teacher_is_seeded():
    a = [task.teacher_response(12, random.Random(5)) for _ in range(2)]
    assert a[0] == a[1]


@pytest.mark.parametrize("prompt,response,valid", [
    ("len 4", "()[]", True),
    ("len 4", "([])", True),
    ("4", "[()]", True),
    ("len 6", "()[]", False),      # too short
    ("len 4", "([)]", False),      # crossed pairs
    ("len 4", "(()(", False),      # unclosed
    ("len 4", "))((", False),      # closes before opening
    ("len 4", "() []", False),     # foreign character
    ("len 4", "()[]\n", False),
    ("length 4", "()[]", False),   # not a task prompt
])
def test_is_valid_hand_written(prompt, response, valid):
    assert task.is_valid(prompt, response) is valid


def test_prompts():
    assert task.make_prompt(12) == "len 12"
    assert task.parse_prompt("len 12") == 12
    assert task.parse_prompt(" 8 ") == 8
    with pytest.raises(ValueError, match="must be even"):
        task.make_prompt(5)
    with pytest.raises(ValueError, match="not a dyck prompt"):
        task.parse_prompt("len twelve")


def test_score_samples():
    scores = task.score_samples(
        ["len 4", "len 6"],
        [["()[]", "()[]", "([])", "(((("], ["()()()", "((", "))))))", "[[[]]]"]],
    )
    assert scores == {
        "valid_rate": 5 / 8,
        "distinct_valid_per_prompt": 2.0,   # {"()[]", "([])"} and {"()()()", "[[[]]]"}
        "distinct_valid_rate": 0.5,
        "num_prompts": 2.0,
        "num_samples": 8.0,
    }
    assert task.score_samples(["len 4"], ["()[]"])["valid_rate"] == 1.0


def test_write_dataset(tmp_path):
    paths = task.write_dataset(tmp_path, n_train=30, n_heldout=7, seed=1)
    assert paths == {"train": str(tmp_path / "train.jsonl"), "heldout": str(tmp_path / "heldout.jsonl")}
    rows = [json.loads(line) for line in open(paths["train"])]
    assert len(rows) == 30 and len(open(paths["heldout"]).readlines()) == 7
    assert all(task.is_valid(r["content"], r["teacher_response"]) for r in rows)
    again = task.write_dataset(tmp_path / "again", n_train=30, n_heldout=7, seed=1)
    assert open(again["train"]).read() == open(paths["train"]).read()


def test_tokenizer_round_trip(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 24 and len(tok) % 8 == 0
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    prompt = tok.encode("len 12")
    response = tok.encode("([])", add_special_tokens=False) + [tok.eos_token_id]
    assert prompt == [1, 19, 18, 9, 10]  # <s> len " " 1 2
    assert response == [4, 6, 7, 5, 2]
    assert tok.decode(prompt + response, skip_special_tokens=True) == "len 12([])"
    assert tok.unk_token_id not in prompt + response


def test_demo_data_through_gad_dataset(tmp_path, tok_dir):
    paths = task.write_dataset(tmp_path, n_train=20, n_heldout=2, seed=0)
    ds = GADDataset(paths["train"], tok_dir, max_prompt_length=8, max_response_length=25)
    assert len(ds) == 20 and ds.skipped == {}
    row = json.loads(open(paths["train"]).readline())
    assert len(ds[0]["teacher_response_ids"]) == len(row["teacher_response"]) + 1


def test_tiny_student_loads_and_runs(tmp_path, tok_dir):
    a = assets.build_tiny_student(tmp_path / "a", tok_dir, seed=3)
    b = assets.build_tiny_student(tmp_path / "b", tok_dir, seed=3)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(a))
    model = AutoModelForCausalLM.from_pretrained(a)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (172, 24, 64)
    assert cfg.tie_word_embeddings is False and cfg.rms_norm_eps == 1e-5
    state_b = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert all(torch.equal(v, state_b[k]) for k, v in model.state_dict().items())
    tok = AutoTokenizer.from_pretrained(a)
    ids = torch.tensor([tok.encode("len 4") + tok.encode("()[]", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 8, 24) and torch.isfinite(logits).all()

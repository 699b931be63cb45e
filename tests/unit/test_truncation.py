"""data.truncation (verl's values): a prompt over data.max_prompt_length is refused (error) or cut to
its end (left), its start (right) or both halves (middle); responses are never cut."""

from __future__ import annotations

import json

import pytest
from test_data import ids, make_tokenizer

from megatron_gad.config import ConfigError, load_config
from megatron_gad.data import DataError, GADDataset, truncate_prompt


@pytest.mark.parametrize("mode,expected", [
    ("left", [6, 7, 8, 9]), ("right", [0, 1, 2, 3]), ("middle", [0, 1, 8, 9]), ("error", list(range(10))),
])
def test_truncate_prompt_values(mode, expected):
    assert truncate_prompt(range(10), 4, mode) == expected


def test_middle_with_an_odd_budget_keeps_more_of_the_end():
    # verl: left half = max // 2 tokens, right half = the rest
    assert truncate_prompt(range(10), 5, "middle") == [0, 1, 7, 8, 9]
    assert truncate_prompt(range(3), 5, "middle") == [0, 1, 2]  # fits: unchanged


def _rows(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"content": "abcdefghijkl", "teacher_response": "xy"}, {"content": "ab", "teacher_response": "z"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("mode", ["left", "right", "middle"])
def test_dataset_cuts_long_prompts_and_keeps_the_row(tmp_path, mode):
    tok = make_tokenizer()
    ds = GADDataset(_rows(tmp_path), tok, max_prompt_length=6, max_response_length=8, truncation=mode)
    full = [1] + ids("abcdefghijkl")  # <s> + characters, as the tokenizer encodes the prompt
    want = {"left": full[-6:], "right": full[:6], "middle": full[:3] + full[-3:]}[mode]
    assert len(ds) == 2
    assert list(ds[0]["prompt_ids"]) == want
    assert list(ds[1]["prompt_ids"]) == [1] + ids("ab")  # short prompts untouched
    assert list(ds[0]["teacher_response_ids"]) == ids("xy") + [2]


def test_error_mode_still_refuses_or_skips(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(DataError, match="max_prompt_length 6"):
        GADDataset(_rows(tmp_path), tok, max_prompt_length=6, max_response_length=8)
    ds = GADDataset(_rows(tmp_path), tok, max_prompt_length=6, max_response_length=8, on_bad_row="skip")
    assert len(ds) == 1 and ds.skipped == {"prompt_too_long": 1}


def test_config_key_takes_verl_values_only():
    assert load_config(None, ["data.truncation=middle"]).data.truncation == "middle"
    with pytest.raises(ConfigError, match=r"data\.truncation"):
        load_config(None, ["data.truncation=center"])

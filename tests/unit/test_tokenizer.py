"""Every family's tiny model directory loads the same tokenizer (transformers 5 builds a qwen2
directory's tokenizer from its model_type unless the directory's declared class is honoured)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from megatron_gad.tokenizer import declared_class, load_tokenizer
from megatron_gad.tools.tiny_models import CONFIGS, make_hf_model

TEXT = "w5 w6 w7 w40 w95"


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_family_directory_loads_the_saved_tokenizer(tmp_path, family):
    d = make_hf_model(str(tmp_path / family), family)
    assert declared_class(d) == "PreTrainedTokenizerFast"
    tok = load_tokenizer(d)
    # the reference: the `tokenizers` pipeline saved in tokenizer.json, read without transformers
    expected = Tokenizer.from_file(f"{d}/tokenizer.json").encode(TEXT).ids
    assert expected == [5, 6, 7, 40, 95]
    assert tok(TEXT)["input_ids"] == expected
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.decode(expected) == TEXT


def test_demo_tokenizer_declares_its_class(tmp_path):
    from megatron_gad.demo.assets import build_tokenizer

    d = build_tokenizer(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    tok = load_tokenizer(d)
    ref = Tokenizer.from_file(f"{d}/tokenizer.json")
    assert tok("len 12")["input_ids"] == ref.encode("len 12").ids


def test_declared_class_absent_or_unreadable(tmp_path):
    assert declared_class(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("not json")
    assert declared_class(tmp_path) is None

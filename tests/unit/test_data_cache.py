"""The tokenized-data cache and the batched / multi-process tokenization (megatron_gad.tokenized).

The reference is the per-row path the dataset used before (``encode_prompt`` /
``encode_teacher_response`` on one row at a time, then the length checks), rebuilt here."""

import json
import logging
import os
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data import TEMPLATE, make_tokenizer, write_jsonl

from megatron_gad import tokenized
from megatron_gad.data import (
    BadRow,
    DataError,
    GADDataset,
    check_row,
    encode_prompt,
    encode_teacher_response,
    iter_file,
)

ROWS = [
    {"content": "ab c", "teacher_response": "de f"},
    {"content": [{"role": "system", "content": "be"}, {"role": "user", "content": "xy"}], "teacher_response": "q"},
    b"\n",
    {"content": "", "teacher_response": "x"},  # empty prompt
    {"content": "hello there", "teacher_response": "a long answer here"},  # response too long at 8
    {"content": "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz", "teacher_response": "a"},  # long prompt
    b"{not json\n",
    {"content": "k", "teacher_response": "z</s>"},  # EOS string already there
    {"content": "mm", "teacher_response": 5},  # bad type
]


def reference(files, tok, max_prompt=32, max_response=8, keys=("content", "teacher_response")):
    """(prompt ids, response ids, skip counts) the pre-cache one-row-at-a-time path gave."""
    prompts, responses, skipped = [], [], Counter()
    for path in files:
        for _, row in iter_file(path, keys):
            try:
                prompt, text = check_row(row, *keys)
                p = encode_prompt(tok, prompt)
                if len(p) > max_prompt:
                    raise BadRow("prompt_too_long", "")
                r = encode_teacher_response(tok, text)
                if len(r) > max_response:
                    raise BadRow("response_too_long", "")
            except BadRow as e:
                skipped[e.reason] += 1
                continue
            prompts.append(p)
            responses.append(r)
    return prompts, responses, dict(sorted(skipped.items()))


def build(files, tok, cache, **kw):
    kw.setdefault("max_prompt_length", 32)
    kw.setdefault("max_response_length", 8)
    kw.setdefault("on_bad_row", "skip")
    return GADDataset(files, tok, cache_dir=cache, **kw)


def as_lists(ds):
    return [ds[i]["prompt_ids"] for i in range(len(ds))], [ds[i]["teacher_response_ids"] for i in range(len(ds))]


@pytest.fixture(scope="module")
def chat_tok():
    return make_tokenizer(TEMPLATE)


@pytest.fixture()
def two_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    pq.write_table(pa.table({"content": ["pq one", "", "two"], "teacher_response": ["r", "s", "t t"]}),
                   tmp_path / "b.parquet")
    return [a, str(tmp_path / "b.parquet")]


def test_cached_equals_fresh_tokenization(tmp_path, two_files, chat_tok, caplog):
    ref_p, ref_r, ref_skip = reference(two_files, chat_tok)
    assert len(ref_p) == 5 and ref_skip  # the data exercises kept and skipped rows
    cache = str(tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="megatron_gad.tokenized"):
        first = build(two_files, chat_tok, cache)
    assert "tokenized 11 rows in" in caplog.text and "(cached to " in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megatron_gad.tokenized"):
        second = build(two_files, chat_tok, cache)
    assert "loaded 11 rows from cache in" in caplog.text and "tokenized 11" not in caplog.text
    for ds in (first, second):
        assert as_lists(ds) == (ref_p, ref_r)
        assert ds.skipped == ref_skip
        assert ds.prompt_ids == ref_p and ds.teacher_response_ids == ref_r
    assert build(two_files, chat_tok, None).skipped == ref_skip  # no cache at all: same result


def test_kept_row_fields_line_up_with_the_kept_rows(tmp_path, two_files, chat_tok):
    """keep_keys (a verifier's prompt text): one dict per kept row, in the dataset's order, skipped rows
    (bad JSON, empty, too long, across both files) left out; from the cache as from a fresh start."""
    cache = str(tmp_path / "cache")
    for _ in range(2):  # fill the cache, then read it
        ds = build(two_files, chat_tok, cache, keep_keys=("content",))
        assert len(ds.rows) == len(ds)
        for i, row in enumerate(ds.rows):
            assert encode_prompt(chat_tok, row["content"]) == ds[i]["prompt_ids"]
    assert build(two_files, chat_tok, cache).rows == []  # not asked for: nothing kept


def test_length_limits_apply_on_top_of_the_cache(tmp_path, two_files, chat_tok, caplog):
    cache = str(tmp_path / "cache")
    build(two_files, chat_tok, cache)
    with caplog.at_level(logging.INFO, logger="megatron_gad.tokenized"):
        ds = build(two_files, chat_tok, cache, max_prompt_length=80, max_response_length=30)
    assert "from cache" in caplog.text  # other limits, same tokenization
    p, r, skip = reference(two_files, chat_tok, 80, 30)
    assert as_lists(ds) == (p, r) and ds.skipped == skip
    assert "prompt_too_long" not in skip and len(p) == 7


def test_bad_row_error_from_the_cache_names_the_first_bad_row(tmp_path, two_files, chat_tok):
    cache = str(tmp_path / "cache")
    build(two_files, chat_tok, cache)  # cache filled by a skipping run
    with pytest.raises(DataError, match=r"a\.jsonl:4: empty prompt 'content'"):
        build(two_files, chat_tok, cache, on_bad_row="error")
    with pytest.raises(DataError, match=r"b\.parquet row 2: empty prompt"):
        build(two_files[1:], chat_tok, cache, on_bad_row="error")
    ok = write_jsonl(tmp_path / "ok.jsonl", [ROWS[0], ROWS[4]])
    build([ok], chat_tok, cache, max_response_length=30)
    with pytest.raises(DataError, match=r"ok\.jsonl:2: teacher response has 19 tokens \(with EOS\) > "
                                        r"max_response_length 8"):
        build([ok], chat_tok, cache, on_bad_row="error")


def test_key_follows_file_bytes_tokenizer_and_row_keys(tmp_path, two_files, chat_tok):
    key = tokenized.cache_key(two_files, chat_tok, "content", "teacher_response")
    copy = str(tmp_path / "copy.jsonl")
    shutil.copy(two_files[0], copy)
    assert tokenized.cache_key([copy, two_files[1]], chat_tok, "content", "teacher_response") == key  # bytes, not paths
    assert tokenized.cache_key(two_files[::-1], chat_tok, "content", "teacher_response") != key  # order
    with open(copy, "ab") as f:
        f.write(b'{"content": "new", "teacher_response": "row"}\n')
    assert tokenized.cache_key([copy, two_files[1]], chat_tok, "content", "teacher_response") != key
    assert tokenized.cache_key(two_files, make_tokenizer(TEMPLATE.replace(":", "=")), "content",
                               "teacher_response") != key  # chat template
    assert tokenized.cache_key(two_files, make_tokenizer(), "content", "teacher_response") != key  # no template
    other_vocab = make_tokenizer(TEMPLATE)
    other_vocab.add_tokens(["zz"])
    assert tokenized.cache_key(two_files, other_vocab, "content", "teacher_response") != key
    assert tokenized.cache_key(two_files, chat_tok, "prompt", "teacher_response") != key
    assert tokenized.cache_key(two_files, chat_tok, "content", "answer") != key
    assert tokenized.cache_key(two_files, make_tokenizer(TEMPLATE), "content", "teacher_response") == key


def test_changed_file_is_tokenized_again(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    cache = str(tmp_path / "cache")
    assert len(build([path], chat_tok, cache)) == 2
    write_jsonl(path, ROWS[:2] + [{"content": "new", "teacher_response": "row"}])
    ds = build([path], chat_tok, cache)
    assert as_lists(ds) == reference([path], chat_tok)[:2] and len(ds) == 3
    assert len(os.listdir(cache)) == 2  # one entry per key


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta", "missing"])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, two_files, chat_tok, caplog, damage):
    cache = str(tmp_path / "cache")
    build(two_files, chat_tok, cache)
    (entry,) = os.listdir(cache)
    values = os.path.join(cache, entry, "response_values.npy")
    if damage == "truncate":
        with open(values, "r+b") as f:
            f.truncate(os.path.getsize(values) - 4)
    elif damage == "flip":  # same size, one token changed: only the checksum can tell
        arr = np.load(values)
        arr[0] += 1
        np.save(values, arr)
    elif damage == "meta":
        with open(os.path.join(cache, entry, "meta.json"), "w") as f:
            f.write("{")
    else:
        os.remove(os.path.join(cache, entry, "line.npy"))
    with caplog.at_level(logging.INFO, logger="megatron_gad.tokenized"):
        ds = build(two_files, chat_tok, cache)
    assert "is unusable" in caplog.text and "tokenizing again" in caplog.text and "(cached to " in caplog.text
    assert as_lists(ds) == reference(two_files, chat_tok)[:2]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megatron_gad.tokenized"):
        build(two_files, chat_tok, cache)
    assert "from cache" in caplog.text and "unusable" not in caplog.text  # the rebuilt copy is good


def test_cache_write_is_atomic_and_optional(tmp_path, two_files, chat_tok, caplog, monkeypatch):
    cache = str(tmp_path / "cache")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenized.np, "save", fail)
    with caplog.at_level(logging.WARNING, logger="megatron_gad.tokenized"):
        ds = build(two_files, chat_tok, cache)  # training still starts
    assert "could not write the cache" in caplog.text and len(ds) == 5
    assert os.listdir(cache) == []  # no half-written entry left behind
    monkeypatch.undo()
    build(two_files, chat_tok, cache)
    assert [e.startswith("tokens-") for e in os.listdir(cache)] == [True]


def test_process_pool_matches_reference(tmp_path, chat_tok, monkeypatch):
    rows = []
    for i in range(60):
        words = " ".join("abcdefgh"[(i + j) % 8] * (1 + j % 3) for j in range(i % 7 + 1))
        content = words if i % 2 else [{"role": "user", "content": words}]
        rows.append({"content": content, "teacher_response": words[::-1] + ("</s>" if i % 5 == 0 else "")})
    rows[17] = {"content": "", "teacher_response": "x"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    monkeypatch.setattr(tokenized, "CHUNK_ROWS", 7)  # several chunks, the last one short
    monkeypatch.setattr(tokenized, "POOL_MIN_ROWS", 10)
    ds = build([path], chat_tok, None, max_prompt_length=40, max_response_length=30, num_workers=2)
    p, r, skip = reference([path], chat_tok, 40, 30)
    assert as_lists(ds) == (p, r) and ds.skipped == skip and len(p) >= 50


def test_plain_tokenizer_message_rows_and_ragged_ids(tmp_path):
    plain = make_tokenizer()  # no chat template: message-list prompts are bad rows
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds = build([path], plain, str(tmp_path / "c"))
    p, r, skip = reference([path], plain)
    assert as_lists(ds) == (p, r) and ds.skipped == skip and skip["no_chat_template"] == 1
    ids = ds.prompt_ids
    assert ids[-1] == p[-1] and ids[0:2] == p[0:2] and list(ids) == p
    with pytest.raises(IndexError):
        ids[len(p)]
    assert json.dumps(ds[0])  # plain Python ints, as before


def test_config_keys_reach_the_dataset(tmp_path):
    from megatron_gad.config import ConfigError, load_config, validate

    cfg = load_config(None, ["data.tokenize_workers=4", "data.cache_dir=/tmp/x", "data.use_cache=false"])
    assert (cfg.data.tokenize_workers, cfg.data.cache_dir, cfg.data.use_cache) == (4, "/tmp/x", False)
    with pytest.raises(ConfigError, match=r"data\.tokenize_workers"):
        validate(load_config(None, ["data.tokenize_workers=0"]))

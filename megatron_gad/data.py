"""GAD data: teacher-response datasets, a resumable prompt loader and verl-layout collation.

Rows hold a prompt (``prompt_key``: a string or a list of chat messages) and the black-box teacher's
text (``teacher_response_key``). Files are JSON lines (``.jsonl``/``.json``) or Parquet.

EOS policy
----------
Student samples end with the EOS token when the student stops by itself, so every teacher response is
tokenised as ``encode(text, add_special_tokens=False) + [eos_token_id]``. A teacher text that already
ends with the EOS string keeps a single EOS (the string is removed before encoding). Both sides of the
discriminator therefore end the same way; otherwise it could separate teacher from student by the
final token alone (d_acc ~ 1, useless reward). Student samples cut at the max response length without
an EOS are the trainer's concern, not this module's.

Prompts are encoded with the tokenizer's chat template (``add_generation_prompt=True``) when it has one
(a string prompt becomes one user message); without a template a string prompt is encoded plainly
(with the tokenizer's own special tokens, e.g. BOS) and a message list is an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from megatron_gad.errors import InputError, UserError
from megatron_gad.tokenized import as_ids

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


class DataError(UserError, ValueError):
    """A bad row or file; the message names the file, the 1-based line (or row) and the problem."""


class BadRow(DataError):
    """One bad row: a skip reason plus the problem; the dataset adds the file and line."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason = reason
        self.problem = problem


# ----------------------------------------------------------------------------------------------
# Reading rows
# ----------------------------------------------------------------------------------------------


def location(path: str, number: int) -> str:
    """How messages name a row: ``file:line`` for JSONL, ``file row N`` for Parquet (1-based)."""
    return f"{path} row {number}" if path.lower().endswith(PARQUET_SUFFIXES) else f"{path}:{number}"


def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """Yields (line number, row-or-BadRow); blank lines (e.g. a trailing newline) are not rows."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, BadRow("invalid_utf8", f"invalid UTF-8 at byte {e.start}")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, BadRow("invalid_json", f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            yield line_no, row


def _iter_parquet(path: str, keys: Sequence[str]) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row_no = 0
    try:
        pf = pq.ParquetFile(path)
        # Read only the columns we need; absent ones surface as "missing key" per row.
        columns = [k for k in keys if k in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=columns, batch_size=4096):
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row
    except (pa.ArrowException, OSError) as e:
        # a truncated or overwritten file fails in the footer, or in a row group half way through
        where = f" after row {row_no}" if row_no else ""
        raise InputError(f"{path}: damaged Parquet file, cannot be read{where} ({' '.join(str(e).split())}); "
                         "write it again (e.g. pandas.DataFrame.to_parquet) or convert it to JSONL") from None


def iter_numbered(path: str, keys: Sequence[str]) -> Iterator[tuple[int, Any]]:
    """(line or row number, row) for every row of a JSONL or Parquet file (``keys``: the Parquet columns
    to read); a row that cannot be parsed comes as a :class:`BadRow` for :func:`check_row` to raise."""
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return _iter_jsonl(path)
    if lower.endswith(PARQUET_SUFFIXES):
        return _iter_parquet(path, keys)
    raise DataError(f"{path}: unsupported file type (expected .jsonl, .json or .parquet)")


def iter_file(path: str, keys: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """:func:`iter_numbered` with each row's :func:`location` string."""
    return ((location(path, n), row) for n, row in iter_numbered(path, keys))


def _check_prompt(value: Any, key: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("empty", f"empty prompt '{key}'")
        return value
    if isinstance(value, list):
        if not value:
            raise BadRow("empty", f"empty prompt '{key}' (no messages)")
        for i, msg in enumerate(value):
            if not (
                isinstance(msg, dict)
                and isinstance(msg.get("role"), str)
                and isinstance(msg.get("content"), str)
            ):
                raise BadRow(
                    "bad_type", f"prompt '{key}' message {i} is not {{'role': str, 'content': str}}"
                )
        if not any(msg["content"].strip() for msg in value):
            raise BadRow("empty", f"empty prompt '{key}' (all messages empty)")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise BadRow(
        "bad_type", f"prompt '{key}' must be a string or a list of messages, got {type(value).__name__}"
    )


def check_row(row: Any, prompt_key: str, response_key: str) -> tuple[Any, str]:
    """(prompt, response text) of a row, or :class:`BadRow` naming what is wrong with it."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("bad_type", f"row is not an object, got {type(row).__name__}")
    for key in (prompt_key, response_key):
        if key not in row:
            raise BadRow("missing_key", f"missing key '{key}'")
        if row[key] is None:
            raise BadRow("missing_key", f"null value for '{key}'")
    prompt = _check_prompt(row[prompt_key], prompt_key)
    response = row[response_key]
    if not isinstance(response, str):
        raise BadRow(
            "bad_type", f"teacher response '{response_key}' must be a string, got {type(response).__name__}"
        )
    if not response.strip():
        raise BadRow("empty", f"empty teacher response '{response_key}'")
    return prompt, response


# ----------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt, following the module's template policy."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return as_ids(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    if not isinstance(prompt, str):
        raise BadRow("no_chat_template", "prompt is a message list but the tokenizer has no chat template")
    return as_ids(tokenizer.encode(prompt))


def encode_teacher_response(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a teacher response, ending with exactly one EOS (see the module docstring)."""
    eos_id = tokenizer.eos_token_id
    eos = tokenizer.eos_token
    if eos and text.endswith(eos):
        text = text[: -len(eos)]
    ids = as_ids(tokenizer.encode(text, add_special_tokens=False)) if text else []
    if not ids or ids[-1] != eos_id:
        ids.append(int(eos_id))
    return ids


def no_eos_message(tokenizer: Any) -> str:
    where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    return (f"{where}: the tokenizer has no EOS token (eos_token is not set); GAD ends every teacher response and "
            "student sample with it: set \"eos_token\" in the model's tokenizer_config.json (or tokenizer.eos_token = "
            "'...' then tokenizer.save_pretrained(path)) to the token the model ends its answers with")


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


TRUNCATIONS = ("error", "left", "right", "middle")


def truncate_prompt(ids: Sequence[int], max_length: int, mode: str) -> list[int]:
    """verl's prompt truncation: ``ids`` cut to ``max_length`` tokens (unchanged when they fit, or
    with mode ``error``, whose long prompts never get here): ``left`` keeps the last tokens, ``right``
    the first, ``middle`` the first ``max_length // 2`` and the last ``max_length - max_length // 2``."""
    ids = list(ids)
    if len(ids) <= max_length or mode == "error":
        return ids
    if mode == "left":
        return ids[len(ids) - max_length:]
    if mode == "right":
        return ids[:max_length]
    head = max_length // 2
    return ids[:head] + ids[len(ids) - (max_length - head):]


class GADDataset:
    """Tokenised (prompt, teacher response) pairs, checked and tokenised once at construction.

    Rows are tokenized in batches, in ``num_workers`` processes for large sets (None: one per CPU, at
    most 16), and cached under ``cache_dir`` (None: no cache) keyed by the files' bytes, the tokenizer
    and the row keys (:mod:`megatron_gad.tokenized`); the length limits and ``on_bad_row`` apply on
    top, so changing them reuses the cache. ``prompt_ids`` / ``teacher_response_ids`` are read-only
    sequences of ``list[int]`` backed by flat int32 arrays.
    """

    def __init__(
        self,
        files: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: Any,
        prompt_key: str = "content",
        teacher_response_key: str = "teacher_response",
        max_prompt_length: int = 2048,
        max_response_length: int = 1536,
        on_bad_row: str = "error",
        keep_keys: Sequence[str] = (),
        cache_dir: str | os.PathLike | None = None,
        num_workers: int | None = None,
        truncation: str = "error",
    ):
        """``keep_keys``: fields of each kept row to keep as read (``self.rows[i]``; e.g. the prompt
        text and ground truth a verifier reads); none by default. ``truncation`` (verl's
        ``data.truncation``): a prompt over ``max_prompt_length`` is a bad row (``error``) or is cut to
        it, keeping its end (``left``), its start (``right``) or both halves (``middle``)."""
        from megatron_gad import tokenized

        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
        self.truncation = truncation
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        if isinstance(tokenizer, (str, os.PathLike)):
            from megatron_gad.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        if tokenizer.eos_token_id is None:
            raise InputError(no_eos_message(tokenizer))
        self.files = [str(f) for f in files]
        for path in self.files:  # before hashing them for the cache
            if not path.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
                raise DataError(f"{path}: unsupported file type (expected .jsonl, .json or .parquet)")
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such data file")
        self.tokenizer = tokenizer
        self.prompt_key = prompt_key
        self.teacher_response_key = teacher_response_key
        self.max_prompt_length = max_prompt_length
        self.max_response_length = max_response_length
        self.on_bad_row = on_bad_row
        workers = tokenized.default_workers() if num_workers is None else num_workers
        rows = tokenized.load_or_build(None if cache_dir is None else str(cache_dir), self.files, tokenizer,
                                       prompt_key, teacher_response_key, lambda: self._read_and_tokenize(workers))
        kept, skipped = self._select(rows)
        self.prompt_ids = tokenized.RaggedIds(rows.prompt.values, rows.prompt.offsets, kept)
        self.teacher_response_ids = tokenized.RaggedIds(rows.response.values, rows.response.offsets, kept)
        self.rows: list[dict[str, Any]] = self._kept_fields(kept, keep_keys) if keep_keys else []
        self.skipped = dict(sorted(skipped.items()))
        if self.skipped:
            logger.warning(
                "GADDataset: kept %d rows, skipped %d bad rows (%s)",
                len(self),
                sum(self.skipped.values()),
                ", ".join(f"{k}={v}" for k, v in self.skipped.items()),
            )

    def _read_and_tokenize(self, num_workers: int):
        """Every row of the files checked and tokenized (bad rows kept, with their reason)."""
        from megatron_gad import tokenized

        prompts: list[Any] = []
        responses: list[str] = []
        good: list[int] = []
        file_index: list[int] = []
        line: list[int] = []
        bad: dict[int, tuple[str, str]] = {}
        for fi, path in enumerate(self.files):
            for number, row in iter_numbered(path, (self.prompt_key, self.teacher_response_key)):
                r = len(line)
                file_index.append(fi)
                line.append(number)
                try:
                    prompt, response = check_row(row, self.prompt_key, self.teacher_response_key)
                except BadRow as e:
                    bad[r] = (e.reason, e.problem)
                    continue
                good.append(r)
                prompts.append(prompt)
                responses.append(response)
        p_ids, r_ids, tok_bad = tokenized.tokenize_all(self.tokenizer, prompts, responses, num_workers)
        for i, reason, problem in tok_bad:
            bad[good[i]] = (reason, problem)
        # lay the good rows' ids out over all rows (bad rows: no ids)
        good_idx = np.asarray(good, dtype=np.int64)
        sides = []
        for ids in (p_ids, r_ids):
            lengths = np.zeros(len(line), dtype=np.int64)
            lengths[good_idx] = ids.lengths()
            offsets = np.zeros(len(line) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            sides.append(tokenized.RaggedIds(ids.values, offsets))
        return tokenized.TokenizedRows(sides[0], sides[1], np.asarray(file_index, dtype=np.int32),
                                       np.asarray(line, dtype=np.int64), sorted((r, *v) for r, v in bad.items()))

    def _kept_fields(self, kept: np.ndarray, keys: Sequence[str]) -> list[dict[str, Any]]:
        """``keys`` of each kept row as the file has them (not cached: read again, in the order the rows
        were numbered, only when asked for, e.g. by a verifier)."""
        want = set(kept.tolist())
        out: list[dict[str, Any]] = []
        r = 0
        for path in self.files:
            for _, row in iter_numbered(path, (self.prompt_key, self.teacher_response_key, *keys)):
                if r in want:
                    out.append({k: row[k] for k in keys if k in row})
                r += 1
        return out

    def _select(self, rows) -> tuple[np.ndarray, Counter[str]]:
        """Indices of the rows kept under the length limits and the bad-row policy, and skip counts per
        reason; with on_bad_row='error', the first bad row (in file order) raises."""
        p_len, r_len = rows.prompt.lengths(), rows.response.lengths()
        bad: dict[int, tuple[str, str]] = {}
        # the reason a row gets is the first check it fails: row checks, prompt length, response length
        for r in np.flatnonzero(r_len > self.max_response_length).tolist():
            bad[r] = ("response_too_long", f"teacher response has {int(r_len[r])} tokens (with EOS) > "
                      f"max_response_length {self.max_response_length}")
        long_prompts = [] if self.truncation != "error" else np.flatnonzero(p_len > self.max_prompt_length).tolist()
        for r in long_prompts:  # with truncation on they are cut in __getitem__ instead
            bad[r] = ("prompt_too_long", f"prompt has {int(p_len[r])} tokens > max_prompt_length "
                      f"{self.max_prompt_length}")
        # Text that the tokenizer maps to no token (characters it drops, a response that is only the EOS
        # string) passes the row checks; as a training row it would die at its first rollout or pair.
        for r in np.flatnonzero(p_len == 0).tolist():
            bad[r] = ("empty_prompt_tokens", "prompt tokenizes to no token (the tokenizer drops all of its text)")
        for r in np.flatnonzero(r_len <= 1).tolist():
            bad[r] = ("empty_response_tokens", "teacher response tokenizes to no token before EOS (the tokenizer "
                      "drops all of its text, or it is only the EOS string)")
        bad.update({r: (reason, problem) for r, reason, problem in rows.bad})
        if bad and self.on_bad_row == "error":
            r = min(bad)
            raise DataError(f"{location(self.files[rows.file_index[r]], int(rows.line[r]))}: {bad[r][1]}")
        keep = np.ones(len(rows), dtype=bool)
        keep[list(bad)] = False
        return np.flatnonzero(keep), Counter(reason for reason, _ in bad.values())

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "prompt_ids": truncate_prompt(self.prompt_ids[index], self.max_prompt_length, self.truncation),
            "teacher_response_ids": self.teacher_response_ids[index],
            "index": index,
        }


# ----------------------------------------------------------------------------------------------
# Resumable sampling
# ----------------------------------------------------------------------------------------------


class StatefulSampler:
    """Endless iterator of index batches; epoch e uses a permutation seeded by (seed, e).

    The state is (epoch, position in the epoch's order), so a loader restored from
    ``state_dict()`` yields exactly the batches the original would have yielded next.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < 1 or (drop_last and num_samples < batch_size):
            raise ValueError(
                f"{num_samples} samples cannot fill one batch of {batch_size} (drop_last={drop_last})"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __len__(self) -> int:
        """Batches per epoch (iteration itself never ends)."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> StatefulSampler:
        return self

    def __next__(self) -> list[int]:
        remaining = self.num_samples - self.position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        end = min(self.position + self.batch_size, self.num_samples)
        batch = self._order[self.position : end].tolist()
        self.position = end
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Resuming with different data or batching would silently change the batch sequence.
        for key in ("num_samples", "batch_size", "shuffle", "seed", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler has {getattr(self, key)!r}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)


class PromptLoader:
    """Endless iterator of batches (lists of dataset items) with a resumable state."""

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        self.dataset = dataset
        self.sampler = StatefulSampler(len(dataset), batch_size, shuffle, seed, drop_last)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        return [self.dataset[i] for i in next(self.sampler)]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Collation (verl layout: left-padded prompt ++ right-padded response)
# ----------------------------------------------------------------------------------------------


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), both [B, longest] long tensors, padded on the left (prompts, so the
    last column is every row's last token) or on the right (responses)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def build_sequences(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joins left-padded prompts [B,P] and right-padded responses [B,R] into [B,P+R] sequences.

    Returns (input_ids, attention_mask, position_ids); positions count valid tokens from 0 and stay
    at the last valid position over right padding (and at 0 over left padding).
    """
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).to(torch.long)
    position_ids = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a [B,T] mask (any padding side); -1 for an all-zero row."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=-1).to(torch.long)


def collate_prompts(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads a batch of dataset items: left-padded prompts and right-padded teacher responses.

    :func:`build_sequences` joins the two into the teacher's full sequences.
    """
    if not items:
        raise ValueError("collate_prompts needs at least one item")
    prompt_ids, prompt_mask = pad_sequences([it["prompt_ids"] for it in items], pad_id, left=True)
    teacher_response, teacher_response_mask = pad_sequences(
        [it["teacher_response_ids"] for it in items], pad_id, left=False
    )
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "teacher_response": teacher_response,
        "teacher_response_mask": teacher_response_mask,
        "index": torch.tensor([int(it.get("index", -1)) for it in items], dtype=torch.long),  # dataset rows
    }

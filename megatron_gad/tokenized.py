"""Tokenized GAD rows: batched and multi-process tokenization, and an on-disk cache of the result.

A start (or a requeue) of a 200k-row run used to tokenize every row again, one at a time. Here the
rows of all files are tokenized in chunks (one fast-tokenizer call per chunk; chunks spread over a
process pool for large sets) and the token ids are written to ``<cache_dir>/tokens-<key>/`` as flat
int32 arrays plus offsets. The key hashes everything the ids depend on:

* the bytes of every file, in order (not paths or mtimes: a copied file still hits, an edited one
  misses);
* the tokenizer: its class, its full serialized definition (vocab, merges, normalizer, added and
  special tokens), its chat template and EOS;
* the prompt and teacher-response keys, and :data:`TOKENIZE_VERSION` (the template / EOS policy
  of :mod:`megatron_gad.data`).

The lengths limits and ``on_bad_row`` are not in the key: every row is cached with its full token
ids (or the reason it is bad), and the limits are applied when a dataset is built from the cache, so
changing ``max_response_length`` does not tokenize again. A cache that cannot be read or does not
match (truncated file, wrong checksum, other version) is rebuilt with a warning. Writes go to a
temporary directory renamed into place, so a killed job leaves no half-written cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Bump when the tokenization policy in megatron_gad.data (template use, EOS handling) changes, so old
# caches stop matching.
TOKENIZE_VERSION = 1
CACHE_FORMAT = 1
CHUNK_ROWS = 1024
# Below this many rows a process pool costs more to start (each worker imports transformers) than it saves.
POOL_MIN_ROWS = 20_000
ARRAYS = ("prompt_values", "prompt_offsets", "response_values", "response_offsets", "file_index", "line")


class RaggedIds(Sequence):
    """A read-only list of token-id lists kept as one flat int32 array (``values``) plus ``offsets``
    (row r is ``values[offsets[r]:offsets[r + 1]]``), optionally through a row selection ``rows``.
    Items are Python ``list[int]``, as the lists the dataset used to hold."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray, rows: np.ndarray | None = None):
        self.values, self.offsets, self.rows = values, offsets, rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        lens = np.diff(self.offsets)
        return lens if self.rows is None else lens[self.rows]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        r = int(self.rows[index]) if self.rows is not None else index
        return self.values[self.offsets[r]:self.offsets[r + 1]].tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == list(b) for a, b in zip(self, other))

    __hash__ = None  # mutable-looking sequence semantics, like a list

    def __repr__(self) -> str:
        return f"RaggedIds({len(self)} rows, {len(self.values)} values)"


def ragged(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(values int32, offsets int64) of a list of id lists."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
    return values, offsets


@dataclass
class TokenizedRows:
    """Every row of the files, in order: its ids (empty for a bad row), where it is, and, for bad rows,
    (row, reason, problem) in ``bad``."""

    prompt: RaggedIds
    response: RaggedIds
    file_index: np.ndarray  # int32, which file the row came from
    line: np.ndarray  # int64, 1-based line (JSONL) or row (Parquet) number in that file
    bad: list[tuple[int, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.file_index)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"prompt_values": self.prompt.values, "prompt_offsets": self.prompt.offsets,
                "response_values": self.response.values, "response_offsets": self.response.offsets,
                "file_index": self.file_index, "line": self.line}


# ----------------------------------------------------------------------------------------------
# Tokenization (batched, optionally in a process pool)
# ----------------------------------------------------------------------------------------------


def as_ids(out: Any) -> list[int]:
    """Token ids as ints: transformers 5 may return a BatchEncoding even with return_dict=False."""
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]


def tokenize_chunk(tokenizer: Any, prompts: list, responses: list[str]):
    """Token ids of a chunk of checked rows, with :func:`megatron_gad.data.encode_prompt` and
    :func:`~megatron_gad.data.encode_teacher_response`'s policy, in one tokenizer call per side.
    Returns (prompt ids, response ids, [(i, reason, problem)] for rows that cannot be encoded)."""
    bad: list[tuple[int, str, str]] = []
    p_ids: list[list[int]] = [[] for _ in prompts]
    if getattr(tokenizer, "chat_template", None):
        convs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        out = tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=False)
        p_ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out
        if p_ids and not isinstance(p_ids[0], list):  # e.g. tensors from a custom tokenizer
            p_ids = [as_ids(o) for o in p_ids]
    else:
        plain = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        bad += [(i, "no_chat_template", "prompt is a message list but the tokenizer has no chat template")
                for i, p in enumerate(prompts) if not isinstance(p, str)]
        if plain:
            for i, ids in zip(plain, tokenizer([prompts[i] for i in plain])["input_ids"]):
                p_ids[i] = ids
    eos, eos_id = tokenizer.eos_token, int(tokenizer.eos_token_id)
    texts = [t[: -len(eos)] if eos and t.endswith(eos) else t for t in responses]
    nonempty = [i for i, t in enumerate(texts) if t]
    r_ids: list[list[int]] = [[] for _ in texts]
    if nonempty:
        for i, ids in zip(nonempty, tokenizer([texts[i] for i in nonempty], add_special_tokens=False)["input_ids"]):
            r_ids[i] = ids
    for ids in r_ids:
        if not ids or ids[-1] != eos_id:
            ids.append(eos_id)
    for i, _, _ in bad:  # a row that cannot be encoded keeps no ids
        r_ids[i] = []
    return p_ids, r_ids, bad


_worker_tokenizer = None


def _init_worker(tokenizer: Any) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _work(chunk: tuple[list, list[str]]):
    p, r, bad = tokenize_chunk(_worker_tokenizer, *chunk)
    # flat arrays pickle far faster than lists of lists
    return ragged(p), ragged(r), bad


def default_workers() -> int:
    """Processes for tokenization: the CPUs this process may use, at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 16))


def tokenize_all(tokenizer: Any, prompts: list, responses: list[str], num_workers: int
                 ) -> tuple[RaggedIds, RaggedIds, list[tuple[int, str, str]]]:
    """Tokenize checked rows in chunks of :data:`CHUNK_ROWS`, in ``num_workers`` processes when there are
    at least :data:`POOL_MIN_ROWS` rows (else in this process). Row order is kept."""
    chunks = [(prompts[i:i + CHUNK_ROWS], responses[i:i + CHUNK_ROWS]) for i in range(0, len(prompts), CHUNK_ROWS)]
    if num_workers > 1 and len(prompts) >= POOL_MIN_ROWS:
        # spawn: the driver may hold Ray/gRPC threads, which fork would copy in a broken state; one
        # tokenizer thread per worker, the processes are the parallelism
        env = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(num_workers, len(chunks)), initializer=_init_worker, initargs=(tokenizer,)) as pool:
                results = pool.map(_work, chunks, chunksize=1)
        finally:
            if env is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = env
    else:
        results = []
        for chunk in chunks:
            p, r, bad = tokenize_chunk(tokenizer, *chunk)
            results.append((ragged(p), ragged(r), bad))
    bad_all = [(c * CHUNK_ROWS + i, reason, problem) for c, (_, _, bad) in enumerate(results)
               for i, reason, problem in bad]
    return _concat([x[0] for x in results]), _concat([x[1] for x in results]), bad_all


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> RaggedIds:
    if not parts:
        return RaggedIds(np.zeros(0, np.int32), np.zeros(1, np.int64))
    values = np.concatenate([v for v, _ in parts])
    starts = np.cumsum([0] + [len(v) for v, _ in parts[:-1]])
    offsets = np.concatenate([np.zeros(1, np.int64)] + [o[1:] + s for (_, o), s in zip(parts, starts)])
    return RaggedIds(values, offsets)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the token ids this module produces (not the tokenizer's path)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    init = getattr(tokenizer, "init_kwargs", {}) or {}
    desc = {
        "class": type(tokenizer).__name__,
        "definition": definition,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": [tokenizer.eos_token, tokenizer.eos_token_id],
        "special_tokens": getattr(tokenizer, "special_tokens_map", {}),
        "flags": {k: init.get(k) for k in ("add_bos_token", "add_eos_token", "do_lower_case")},
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=repr).encode()).hexdigest()


def cache_key(files: Sequence[str], tokenizer: Any, prompt_key: str, response_key: str) -> str:
    desc = {"format": CACHE_FORMAT, "tokenize_version": TOKENIZE_VERSION,
            "files": [file_digest(f) for f in files], "tokenizer": tokenizer_fingerprint(tokenizer),
            "prompt_key": prompt_key, "teacher_response_key": response_key}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _array_digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()


def save(cache_dir: str, key: str, rows: TokenizedRows, info: dict) -> str:
    """Write ``rows`` to ``<cache_dir>/tokens-<key[:32]>`` atomically; returns that directory."""
    final = os.path.join(cache_dir, f"tokens-{key[:32]}")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokens-tmp-", dir=cache_dir)
    try:
        digests = {}
        for name, arr in rows.arrays().items():
            np.save(os.path.join(tmp, name + ".npy"), arr)
            digests[name] = _array_digest(arr)
        meta = {"key": key, "format": CACHE_FORMAT, "rows": len(rows), "bad": rows.bad, "sha256": digests, **info}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        if os.path.isdir(final):  # a stale or damaged copy under the same key (load refused it)
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process wrote the same key first: its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class CacheMismatch(Exception):
    pass


def load(cache_dir: str, key: str) -> tuple[TokenizedRows, str] | None:
    """The cached rows for ``key`` and their directory, None if there is no cache; raises
    :class:`CacheMismatch` (with the reason) if there is one that cannot be used."""
    path = os.path.join(cache_dir, f"tokens-{key[:32]}")
    if not os.path.isdir(path):
        return None
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            raise CacheMismatch("its key or format differs")
        arrays = {name: np.load(os.path.join(path, name + ".npy"), allow_pickle=False) for name in ARRAYS}
    except CacheMismatch:
        raise
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise CacheMismatch(f"it cannot be read ({type(e).__name__}: {e})") from None
    for name, arr in arrays.items():
        if _array_digest(arr) != meta["sha256"].get(name):
            raise CacheMismatch(f"{name}.npy does not match its checksum")
    n = meta["rows"]
    for side in ("prompt", "response"):
        off = arrays[f"{side}_offsets"]
        if len(off) != n + 1 or off[-1] != len(arrays[f"{side}_values"]):
            raise CacheMismatch(f"its {side} offsets do not match its values")
    rows = TokenizedRows(RaggedIds(arrays["prompt_values"], arrays["prompt_offsets"]),
                         RaggedIds(arrays["response_values"], arrays["response_offsets"]),
                         arrays["file_index"], arrays["line"], [tuple(b) for b in meta["bad"]])
    return rows, path


def load_or_build(cache_dir: str | None, files: Sequence[str], tokenizer: Any, prompt_key: str,
                  response_key: str, build) -> TokenizedRows:
    """Rows from the cache under ``cache_dir`` if it has them, else ``build()`` (and cache the result).
    ``cache_dir`` None: always build, write nothing."""
    t0 = time.perf_counter()
    if cache_dir is None:
        rows = build()
        logger.info("tokenized %d rows in %.1f s (no cache)", len(rows), time.perf_counter() - t0)
        return rows
    key = cache_key(files, tokenizer, prompt_key, response_key)
    try:
        found = load(cache_dir, key)
    except CacheMismatch as e:
        logger.warning("tokenized-data cache %s/tokens-%s is unusable (%s): tokenizing again", cache_dir,
                       key[:32], e)
        found = None
    if found is not None:
        rows, path = found
        logger.info("loaded %d rows from cache in %.1f s (%s)", len(rows), time.perf_counter() - t0, path)
        return rows
    rows = build()
    seconds = time.perf_counter() - t0
    try:
        path = save(cache_dir, key, rows, {"files": list(files), "tokenizer": getattr(tokenizer, "name_or_path", ""),
                                           "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    except OSError as e:  # a read-only or full disk must not stop training
        logger.warning("tokenized %d rows in %.1f s; could not write the cache under %s (%s)", len(rows), seconds,
                       cache_dir, e)
        return rows
    logger.info("tokenized %d rows in %.1f s (cached to %s)", len(rows), seconds, path)
    return rows

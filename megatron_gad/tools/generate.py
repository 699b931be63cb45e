"""``megatron-gad generate``: sample from an HF directory or megatron-gad checkpoint at TP x PP.

The parent process tokenizes and validates; TP*PP spawned ranks (gloo on CPU, NCCL on a GPU:
``state.init_distributed`` picks the backend) build the actor shard and run
:func:`megatron_gad.engine.generate.generate`; rank 0 returns the token ids.

:func:`generate_on_rank` is the per-rank body, usable inside any launched rank (tests run
several models in one launch with :func:`run_specs`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megatron_gad import checkpoint as ckpt
from megatron_gad.tools import ToolError, log, stdout_to_stderr
from megatron_gad.tools.convert import check_layout, read_model_dir


@dataclass(frozen=True)
class GenerateSpec:
    """One generation request. ``prompts`` are unpadded token-id lists (left-padded internally)."""

    model: str
    prompts: list[list[int]]
    max_new_tokens: int
    eos_id: int
    pad_id: int
    tp: int = 1
    pp: int = 1
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int = 0
    vocab_divisible_by: int = 128
    params_dtype: str = "float32"


def generate_on_rank(spec: GenerateSpec) -> list[list[int]]:
    """Inside a launched rank (call within ``cpu_device_mode()`` on CPU): the new tokens of each
    prompt, EOS included when it was produced. Every rank returns the same lists."""
    from megatron_gad.data import pad_sequences
    from megatron_gad.engine.generate import generate
    from megatron_gad.engine.model_shard import ModelShard

    role = ModelShard("actor", spec.model, spec.tp, spec.pp, params_dtype=spec.params_dtype,
                     vocab_divisible_by=spec.vocab_divisible_by, trainable=False)
    ids, mask = pad_sequences(spec.prompts, spec.pad_id, left=True)  # the engine samples at the last column
    out = generate(role, ids, mask, max_new_tokens=spec.max_new_tokens, eos_id=spec.eos_id, pad_id=spec.pad_id,
                   temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, greedy=spec.greedy,
                   seed=spec.seed)
    return [row[m.bool()].tolist() for row, m in zip(out["responses"], out["response_mask"])]


def generate_vllm(spec: GenerateSpec) -> list[int]:
    """The first prompt's new tokens from vLLM in this process (same stop rule as the native engine:
    ``spec.eos_id`` kept). A megatron-gad checkpoint is exported to HF in a temporary directory."""
    import tempfile

    from megatron_gad.engine.vllm_engine import VLLMEngine, vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    if reason:
        raise ToolError(f"--engine vllm: {reason}; or use --engine megatron")
    from megatron_gad.models.arch import read_hf_config

    with tempfile.TemporaryDirectory(prefix="megatron_gad_vllm_") as tmp:
        model_dir = spec.model
        if ckpt.is_megatron_checkpoint(spec.model):
            from megatron_gad.tools.convert import mcore_to_hf

            model_dir = os.path.join(tmp, "hf")
            mcore_to_hf(spec.model, model_dir)
        limit = read_hf_config(model_dir).get("max_position_embeddings", 4096)
        engine = VLLMEngine(model_dir, dtype=spec.params_dtype, seed=spec.seed,
                            max_model_len=min(limit, len(spec.prompts[0]) + spec.max_new_tokens))
        ((tokens, _),) = engine.generate(spec.prompts[:1], max_new_tokens=spec.max_new_tokens, eos_id=spec.eos_id,
                                         seeds=[spec.seed], temperature=spec.temperature, top_k=spec.top_k,
                                         top_p=spec.top_p, greedy=spec.greedy)
    return tokens


def _rank_main(rank: int, world: int, specs: list[GenerateSpec]) -> list[list[list[int]]]:
    stdout_to_stderr()
    return [generate_on_rank(s) for s in specs]


def run_specs(specs: list[GenerateSpec]) -> list[list[list[int]]]:
    """Run several requests (same TP x PP) in one launch of TP*PP ranks; results of rank 0."""
    from megatron_gad.parallel.launch import run_local

    layouts = {(s.tp, s.pp) for s in specs}
    if len(layouts) != 1:
        raise ValueError(f"all specs of one launch need the same TP x PP, got {sorted(layouts)}")
    tp, pp = layouts.pop()
    return run_local(_rank_main, tp * pp, list(specs))[0]


# ---------------------------------------------------------------- CLI body
_CRITIC_REFUSED = {"generate": "it scores sequences and cannot generate",
                   "logprobs": "it has a scalar head, not an LM head, so it gives no log-probs"}


def model_settings(model: str, tp: int, pp: int, vocab_divisible_by: int,
                   command: str = "generate") -> tuple[dict, int, str]:
    """(hf_config, vocab_divisible_by, params_dtype) for MODEL; checkpoints carry their own. ``score``
    needs a critic checkpoint; the other commands an HF directory or actor checkpoint."""
    cfg, _, meta = read_model_dir(model)
    dtype = "float32"
    role = meta.get("role") if meta is not None else None
    if command == "score" and role != "critic":
        what = f"not a critic checkpoint ({ckpt.META} role {role!r})" if meta is not None else \
            f"not a megatron-gad checkpoint (no {ckpt.META})"
        raise ToolError(f"{model} is {what}; `{command}` needs a critic (discriminator) checkpoint, "
                        "e.g. <trainer.default_local_dir>/global_step_<N>/critic")
    if command != "score" and meta is not None and role != "actor":
        raise ToolError(f"{model} is a {role} (discriminator) checkpoint; {_CRITIC_REFUSED[command]}. "
                        "Use an actor checkpoint or HF directory")
    if meta is not None:
        vocab_divisible_by = int(meta["vocab_divisible_by"])
        dtype = meta.get("extra", {}).get("params_dtype", "float32")
    check_layout(cfg, tp, pp, vocab_divisible_by)
    return cfg, vocab_divisible_by, dtype


def load_tokenizer(model: str, required: bool, hint: str = "pass token ids with --prompt-ids instead"):
    from megatron_gad.controller.preflight import TOKENIZER_FILES

    if not any(os.path.isfile(os.path.join(model, f)) for f in TOKENIZER_FILES):
        if required:
            raise ToolError(f"{model}: cannot load a tokenizer (no tokenizer files: none of "
                            f"{', '.join(TOKENIZER_FILES)}); copy the model's tokenizer there ({hint})")
        log(f"no tokenizer in {model}: output text will be empty")
        return None
    try:
        from megatron_gad.tokenizer import load_tokenizer

        return load_tokenizer(model)
    except Exception as e:  # no tokenizer files, or files transformers cannot read
        if required:
            raise ToolError(f"{model}: cannot load a tokenizer ({type(e).__name__}: {e}); {hint}") from None
        log(f"no tokenizer in {model}: output text will be empty")
        return None


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def special_ids(cfg: dict, tok, eos_override: int | None) -> tuple[int, int]:
    eos = eos_override
    if eos is None:
        eos = tok.eos_token_id if tok is not None and tok.eos_token_id is not None else _first(cfg.get("eos_token_id"))
    if eos is None:
        raise ToolError("the model defines no eos_token_id; pass --eos-id")
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else _first(cfg.get("pad_token_id"))
    return int(eos), int(pad if pad is not None else eos)


def _prompt_ids(args, tok) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise ToolError(f"--prompt-ids must be integers separated by spaces, got {args.prompt_ids!r}") from None
        if not ids:
            raise ToolError("--prompt-ids is empty")
        return ids
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise ToolError(f"{args.model}: the tokenizer has no chat template; drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tok(args.prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise ToolError("--prompt tokenizes to no tokens")
    return list(ids)


def main_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise ToolError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature is not None and args.temperature <= 0:
        raise ToolError(f"--temperature must be > 0 (use --greedy for argmax decoding), got {args.temperature}")
    if args.top_k == 0 or args.top_k < -1:
        raise ToolError(f"--top-k must be -1 (off) or >= 1, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ToolError(f"--top-p must be in (0, 1], got {args.top_p}")
    cfg, vdb, dtype = model_settings(args.model, args.tp, args.pp, args.vocab_divisible_by)
    tok = load_tokenizer(args.model, required=args.prompt is not None)
    prompt = _prompt_ids(args, tok)
    vocab = cfg["vocab_size"]
    if max(prompt) >= vocab or min(prompt) < 0:
        raise ToolError(f"prompt token ids must be in [0, {vocab}) for this model")
    eos, pad = special_ids(cfg, tok, args.eos_id)
    spec = GenerateSpec(model=args.model, prompts=[prompt], max_new_tokens=args.max_new_tokens, eos_id=eos,
                        pad_id=pad, tp=args.tp, pp=args.pp, greedy=args.greedy,
                        temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        vocab_divisible_by=vdb, params_dtype=dtype)
    mode = "greedy" if args.greedy else f"sampling (T={spec.temperature}, top-k={args.top_k}, top-p={args.top_p}, " \
                                         f"seed={args.seed})"
    if getattr(args, "engine", "megatron") == "vllm":
        log(f"generate: {len(prompt)} prompt tokens, up to {args.max_new_tokens} new, {mode}, vLLM")
        tokens = generate_vllm(spec)
    else:
        log(f"generate: {len(prompt)} prompt tokens, up to {args.max_new_tokens} new, {mode}, "
            f"TP={args.tp} PP={args.pp}; launching {args.tp * args.pp} rank(s)")
        ((tokens,),) = run_specs([spec])  # one spec, one prompt
    text = tok.decode(tokens, skip_special_tokens=True) if tok is not None else ""
    if args.json:
        print(json.dumps({"token_ids": tokens, "text": text}), flush=True)
    else:
        print(text, flush=True)
    return 0

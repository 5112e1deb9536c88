"""The command line: `pylora info | demo | merge | bench` (also `python -m pylora ...`)."""
from __future__ import annotations

import argparse
import sys

# pylora.checkpoint.OUT_DTYPES' names, here without importing torch before the arguments are parsed.
OUT_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _adapter_info(args) -> int:
    """What an adapter directory holds and every problem found, without a model; exit status 1 when
    there is a problem."""
    import os

    from pylora import io

    ins = io.inspect_adapter(args.adapter, args.adapter_name, allow_pickle=args.allow_pickle)
    lines = [f"adapter: {ins.path}"]
    raw = ins.raw_config or {}
    if ins.raw_config is not None:
        lines.append(f"config: {ins.config_file} (peft_type {raw.get('peft_type')!r}, task_type "
                     f"{raw.get('task_type')!r}, base model {raw.get('base_model_name_or_path')!r})")
    cfg = ins.config
    if cfg is not None:
        lines.append(f"r={cfg.r} lora_alpha={cfg.lora_alpha:g} use_rslora={cfg.use_rslora} bias={cfg.bias!r} "
                     f"lora_bias={cfg.lora_bias} target_modules={cfg.target_modules!r}")
        for name in ("rank_pattern", "alpha_pattern", "modules_to_save", "exclude_modules", "layers_to_transform"):
            if getattr(cfg, name):
                lines.append(f"{name}={getattr(cfg, name)!r}")
    if ins.weights_file is not None:
        total = sum(t.numel() * t.element_size() for t in ins.tensors.values())
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in ins.tensors.values()})
        lines.append(f"weights: {ins.weights_file} ({_size(os.path.getsize(ins.weights_file))}): "
                     f"{len(ins.tensors)} tensors, {sum(t.numel() for t in ins.tensors.values()):,} values "
                     f"({_size(total)}), dtype {', '.join(dtypes) or 'none'}")
    if ins.modules:
        kinds = {}
        for m in ins.modules.values():
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        ranks = sorted({m.r for m in ins.modules.values()})
        lines.append(f"LoRA modules: {len(ins.modules)} ({', '.join(f'{k} {n}' for k, n in kinds.items())}); ranks "
                     f"{', '.join(map(str, ranks))}")
        rows = [["module", "kind", "r", "alpha", "scale", "lora_A", "lora_B", "dtype"]]
        for name, m in ins.modules.items():
            rows.append([name, m.kind, str(m.r), f"{m.alpha:g}", f"{m.scale:.6g}", str(list(m.lora_A.shape)),
                         str(list(m.lora_B.shape)) + (" +bias" if m.lora_B_bias is not None else ""),
                         str(m.lora_A.dtype).removeprefix("torch.")])
        lines += _table(rows)
    elif ins.tensors:
        lines.append("tensors:")
        lines += _table([[k, str(list(t.shape)), str(t.dtype).removeprefix("torch.")] for k, t in ins.tensors.items()])
    if ins.extra_tensors:
        lines.append(f"other tensors: {len(ins.extra_tensors)}")
        lines += _table([[k, ins.extra_kinds[k], str(list(t.shape)), str(t.dtype).removeprefix("torch.")]
                         for k, t in ins.extra_tensors.items()])
    for key, why in ins.ignored.items():
        lines.append(f"not used: {key}: {why}")
    if ins.problems:
        lines.append(f"problems: {len(ins.problems)}")
        lines += [f"  - {p}" for p in ins.problems]
    else:
        lines.append("problems: none")
    print("\n".join(lines))
    return 1 if ins.problems else 0


def _info(args) -> int:
    if args.adapter is not None:
        return _adapter_info(args)
    import torch

    import pylora
    from pylora import _ext, ops

    lines = [f"pylora {pylora.__version__}",
             f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda + ' build' if torch.version.cuda else 'CPU-only build'})"]
    if _ext.loaded:
        lines.append(f"extension: loaded ({_ext._C.__file__})")
        info = _ext.build_info()
        if info["cuda"]:
            lines.append(f"CUDA kernels: compiled with CUDA {info['cuda_version']} for {info['cuda_arches']}")
        else:
            lines.append("CUDA kernels: not compiled (CPU-only build)")
        lines.append(f"CPU kernels: compiled for -march={info['cpu_arch']}")
    else:
        lines.append(f"extension: not loaded ({_ext.load_error}); every op runs its pure-torch reference")
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(d)
            lines.append(f"GPU {d}: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("GPU: none visible")
    lines.append("ops (backends):")
    width = max(len(op) for op in ops.OPS)
    for op in ops.OPS:
        backends = [name for name, dev in (("CPU", "cpu"), ("CUDA", "cuda")) if _ext.has_kernel(op, dev)]
        lines.append(f"  {op:<{width}}  {' '.join(backends + ['reference'])}")
    print("\n".join(lines))
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised so that the merge cleans up its temporary output on the way out."""


class _AdapterAction(argparse.Action):
    """--adapter DIR: one more adapter, weight 1 until a --weight follows it."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.adapters = list(namespace.adapters or []) + [[value, None]]


class _WeightAction(argparse.Action):
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
             f"{_size(s['bytes'])}, dtype {s['dtype'] or 'as the input'}, in {s['seconds']:.1f} s"]
    for output, embedding in s["tied"].items():
        lines.append(f"tied: {output} is stored as {embedding} (tie_word_embeddings): its update went there")
    lines.append(f"copied: {', '.join(s['copied']) or 'nothing'}")
    if s["skipped"]:
        lines.append(f"not copied (weights in another format, or not regular files): {', '.join(s['skipped'])}")
    print("\n".join(lines))
    return 0


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line[2:] if line.startswith("- ") else line for line in lines] or [type(exc).__name__]
    text = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")
    expected = isinstance(exc, (ValueError, OSError))  # CheckpointError, AdapterError, SafetensorsError, I/O
    return text if expected else f"{type(exc).__name__}: {text}"


def _run_merge(args) -> int:
    """Every failure as one line on stderr and a non-zero status (PYLORA_TRACEBACK=1 shows the traceback)."""
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
    except Exception as exc:
        if os.environ.get("PYLORA_TRACEBACK"):
            raise
        print(f"pylora merge: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, not argparse's usage block: the message says what is wrong, --help the rest.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pylora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("info", help="versions, what the extension holds, the GPU, each op's backends; with "
                                    "--adapter, what an adapter directory holds and the problems found")
    p.add_argument("--adapter", metavar="DIR", help="describe the PEFT adapter in DIR (no model needed)")
    p.add_argument("--adapter-name", metavar="NAME", help="the named adapter in DIR/NAME (PEFT's layout)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read adapter_model.bin with torch.load(weights_only=True) when there is no safetensors")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="train adapters on synthetic tasks, serve them in one mixed batch, check exact "
                                    "merge/unmerge, and report accuracy and throughput")
    from pylora import demo

    demo.add_arguments(p)
    p.set_defaults(func=lambda args: demo.run(args))
    p = sub.add_parser("bench", help="run the benchmark suites (quick by default), print tables, write JSON and a chart")
    from pylora import bench_cli

    bench_cli.add_arguments(p)
    p.set_defaults(func=lambda args: bench_cli.run(args))

    p = sub.add_parser("merge", help="merge PEFT adapters into a safetensors checkpoint, tensor by tensor",
                       description="Merge PEFT LoRA adapters into a transformers-style safetensors checkpoint "
                                   "(model.safetensors, or shards with model.safetensors.index.json), one tensor "
                                   "at a time: W += weight * scale * B A for each adapter in turn, accumulated in "
                                   "fp32. Everything is checked before anything is written; the output appears "
                                   "only when complete. Other files (config, tokenizer, ...) are copied.")
    p.add_argument("--base", required=True, metavar="DIR", help="the checkpoint directory to merge into (read only)")
    p.add_argument("--adapter", required=True, metavar="DIR", action=_AdapterAction, dest="adapters",
                   help="a PEFT adapter directory; repeat for several, applied in order")
    p.add_argument("--weight", metavar="W", action=_WeightAction, dest="weight_",
                   help="the weight of the --adapter just before it (default 1): W += weight * scale * B A")
    p.add_argument("--out", required=True, metavar="DIR", help="the output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=sorted(OUT_DTYPE_NAMES),
                   help="write floating tensors in this dtype (merged in float32 when it differs from theirs); "
                        "default: each tensor's own")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read adapter_model.bin with torch.load(weights_only=True) when there is no safetensors")
    p.set_defaults(func=_run_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

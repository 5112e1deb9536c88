"""The command line: `pylora info | demo | merge | bench` (also `python -m pylora ...`)."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pylora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, what the extension holds, the GPU, each op's backends")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

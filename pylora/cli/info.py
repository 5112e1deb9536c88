"""`pylora info`: versions, what the extension holds, the GPU, each op's backends; with --adapter, what
an adapter directory holds and every problem found, without a model."""
from __future__ import annotations

import os

from pylora.cli.text import size, table


def _adapter_info(args) -> int:
    """What an adapter directory holds and every problem found, without a model; exit status 1 when
    there is a problem."""
    from pylora.adapters import inspect_adapter

    ins = inspect_adapter(args.adapter, args.adapter_name, allow_pickle=args.allow_pickle)
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
        lines.append(f"weights: {ins.weights_file} ({size(os.path.getsize(ins.weights_file))}): "
                     f"{len(ins.tensors)} tensors, {sum(t.numel() for t in ins.tensors.values()):,} values "
                     f"({size(total)}), dtype {', '.join(dtypes) or 'none'}")
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
        lines += table(rows)
    elif ins.tensors:
        lines.append("tensors:")
        lines += table([[k, str(list(t.shape)), str(t.dtype).removeprefix("torch.")] for k, t in ins.tensors.items()])
    if ins.extra_tensors:
        lines.append(f"other tensors: {len(ins.extra_tensors)}")
        lines += table([[k, ins.extra_kinds[k], str(list(t.shape)), str(t.dtype).removeprefix("torch.")]
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


# The CPU kernels' ISA levels (csrc/common/isa.h), in words.
_ISA_WORDS = {"avx512": "AVX-512 with BF16", "avx2": "AVX2 + FMA + F16C", "default": "plain C++, no AVX"}


def _extension_lines(_ext) -> list[str]:
    """What the extension holds and which CPU kernels run, or why it is not loaded."""
    if not _ext.loaded:
        return [f"extension: not loaded ({_ext.load_error}); every op runs its pure-torch reference"]
    info = _ext.build_info()
    lines = [f"extension: loaded ({_ext._C.__file__}), built for torch {info['torch_version']}"]
    if info["cuda"]:
        lines.append(f"CUDA kernels: compiled with CUDA {info['cuda_version']} for {info['cuda_arches']}")
    else:
        lines.append("CUDA kernels: not compiled (CPU-only build)")
    isa = info["cpu_isa"]
    if info["cpu_arch"]:
        lines.append(f"CPU kernels: {isa} running (a native build for -march={info['cpu_arch']}: one level)")
    else:
        lines.append(f"CPU kernels: {isa} running ({_ISA_WORDS.get(isa, isa)}); compiled: "
                     f"{', '.join(info['cpu_isas'])}; this CPU runs: {', '.join(info['cpu_isas_supported'])}")
    if info["cpu_isa_note"]:
        lines.append(f"CPU kernels: {info['cpu_isa_note']}")
    elif info["cpu_isa_request"]:
        lines.append(f"CPU kernels: PYLORA_CPU_ISA={info['cpu_isa_request']} followed")
    return lines


def run(args) -> int:
    if args.adapter is not None:
        return _adapter_info(args)
    import torch

    import pylora
    from pylora import _ext, ops

    lines = [f"pylora {pylora.__version__}",
             f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda + ' build' if torch.version.cuda else 'CPU-only build'})"]
    lines += _extension_lines(_ext)
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

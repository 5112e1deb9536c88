"""MultiLoRA: many adapters over one base model, every row of a batch with its own adapter (or none).

    server = pylora.MultiLoRA(base_model)
    server.load_adapter("alice", "adapters/alice")          # a PEFT-format directory
    server.load_adapter("bob", trained_model)               # or a pylora-trained model in memory
    out = server(input_ids=ids, adapter_names=["alice", None, "bob"])
    text = server.generate(input_ids=ids, adapter_names=[...], max_new_tokens=20)

The server wraps the union of the loaded adapters' target modules. Each forward builds one batch
plan on the host (which slot each row uses, as segments of tokens), moves it to the device once,
and every wrapped module adds its LoRA update with pylora.ops.lora_apply_ (nothing in the
per-layer path synchronises with the device). Every other argument goes to the model unchanged,
so prefill, incremental decoding with a KV cache and `generate` work.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pylora import ops
from pylora.adapters import AdapterError, AdapterWarning, as_adapter, fit
from pylora.adapters.source import Source
from pylora.nn.inject import plain_state, set_module
from pylora.nn.kinds import features
from pylora.nn.layers import LoraLayer
from pylora.serve.batch import segments
from pylora.serve.pool import AdapterPool, AdapterUnloaded, HostAdapter, ModulePool


class _Batch:
    """What one forward's wrapped modules share: the snapshot, each row's slot, the device plans."""

    def __init__(self, snapshot, row_slots: list, num_slots: int):
        self.snapshot = snapshot
        self.row_slots = row_slots
        self.num_slots = num_slots
        self.any = any(s >= 0 for s in row_slots)
        self._plans = {}

    def slots_for(self, rows: int) -> list:
        B = len(self.row_slots)
        if rows == B:
            return self.row_slots
        if rows % B == 0:  # generate() with num_beams / num_return_sequences repeats each row in place
            k = rows // B
            return [s for s in self.row_slots for _ in range(k)]
        raise ValueError(f"MultiLoRA: a wrapped module saw a batch of {rows} rows, but adapter_names has {B} "
                         "entries (one per row)")

    def plan(self, rows: int, tokens: int, device) -> tuple:
        key = (rows, tokens, str(device))
        plan = self._plans.get(key)
        if plan is None:
            if tokens % rows:
                raise ValueError(f"MultiLoRA: {tokens} tokens do not split into {rows} rows")
            seg_ptr, seg_slot = segments(self.slots_for(rows), tokens // rows, self.num_slots)
            if device.type != "cpu":
                seg_ptr = seg_ptr.pin_memory().to(device, non_blocking=True)
                seg_slot = seg_slot.pin_memory().to(device, non_blocking=True)
            plan = self._plans[key] = (seg_ptr, seg_slot)
        return plan


class ServedLayer(nn.Module):
    """A module of the base model that adds, per token, the LoRA update of that token's adapter."""

    # The layer stands in for `base_layer`: a view of the model as it was looks through it.
    wraps_base_layer = True

    def __init__(self, base_layer: nn.Module, name: str, server: "MultiLoRA"):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        object.__setattr__(self, "_server", server)  # a plain reference, not a submodule (no cycle)

    def forward(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        batch = self._server._batch()
        if batch is None or not batch.any:
            return y
        tables = batch.snapshot.tables.get(self.name)
        if tables is None or not tables.slot_rows:
            return y
        return self._add_lora(x, y, batch, tables)

    def _add_lora(self, x, y, batch, tables):
        pool = self._server.pool.modules[self.name]
        I, O = pool.in_features, pool.out_features
        x2 = x.reshape(-1, I)
        if x2.dtype != pool.A_rows.dtype:
            x2 = x2.to(pool.A_rows.dtype)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = y if y.dtype == pool.A_rows.dtype and y.is_contiguous() else y.to(pool.A_rows.dtype).contiguous()
        y2 = out.view(-1, O)
        seg_ptr, seg_slot = batch.plan(x.shape[0], x2.shape[0], x.device)
        ops.lora_apply_(y2, x2, pool.A_rows, pool.B_rows, tables.row_ptr, tables.row_idx, tables.scales, seg_ptr,
                        seg_slot, check=False)
        return out if out.dtype == y.dtype else out.to(y.dtype)


class ServedEmbedding(ServedLayer):
    """An embedding's per-row LoRA update (PEFT's semantics: the lookup goes through A, then B),
    with torch ops per adapter present in the batch: embeddings carry little compute."""

    def _add_lora(self, ids, y, batch, tables):
        pool = self._server.pool.modules[self.name]
        base = self.base_layer
        slots = torch.tensor(batch.slots_for(ids.shape[0]), device=ids.device)
        out = y.clone()
        for slot, rows in tables.slot_rows.items():
            sel = (slots == slot).nonzero().flatten()
            if sel.numel() == 0:
                continue
            idx = torch.tensor(rows, device=pool.A_rows.device)
            A, B = pool.A_rows.index_select(0, idx), pool.B_rows.index_select(0, idx)  # [r, V], [r, D]
            after_A = F.embedding(ids[sel], A.t(), padding_idx=base.padding_idx)
            scale = float(tables.scales[slot])
            out[sel] += ((after_A @ B) * scale).to(out.dtype)
        return out


class MultiLoRA(nn.Module):
    """Serves many LoRA adapters over one base model; see the module docstring.

    capacity_rows: rank rows per wrapped module (default 1024: e.g. 64 adapters of rank 16);
    capacity_bytes: alternatively, the bytes each module's pool may take (rows follow from I + O);
    max_adapters: how many adapters may be resident on the device at once (slots).
    Every loaded adapter keeps a host copy; when a batch names one that is not resident, it is
    copied in, evicting the least recently used unpinned adapters when the pool is full.
    """

    def __init__(self, model: nn.Module, *, capacity_rows: Optional[int] = None, capacity_bytes: Optional[int] = None,
                 max_adapters: int = 64, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if any(isinstance(m, LoraLayer) for m in model.modules()):
            raise ValueError("MultiLoRA: the model holds pylora LoRA layers; pass the base model (merge_and_unload or "
                             "unload it first), and load the trained model as an adapter instead")
        if capacity_rows is not None and capacity_bytes is not None:
            raise ValueError("MultiLoRA: give capacity_rows or capacity_bytes, not both")
        first = next(model.parameters())
        self.model = model
        self.dtype = dtype or first.dtype
        self.device = torch.device(device) if device is not None else first.device
        self._capacity_bytes = capacity_bytes
        rows = capacity_rows if capacity_rows is not None else 1024
        self.pool = AdapterPool(max_adapters, rows, self.dtype, self.device)
        self._local = threading.local()
        self._load_lock = threading.Lock()  # one load at a time: its checks hold until it is done

    # -- adapters ---------------------------------------------------------------------------------

    def load_adapter(self, name: str, source: Source, *, pin: bool = False, adapter_name: Optional[str] = None,
                     allow_pickle: bool = False, strict: bool = True) -> None:
        """Load an adapter from a PEFT-format directory (its subfolder `adapter_name`), a pylora model in
        memory, or a pylora.adapters.Adapter.

        It goes through the same checks as pylora.load_adapter (pylora.adapters.as_adapter, then fit
        against the base model, the factors' range checked in the server's dtype), then the server's own:
        Linear, Conv1D and Embedding targets with plain factors over the unchanged base model (no Conv2d,
        lora_bias, modules_to_save or trained biases), a rank each module's pool can hold, a new name.
        Raises AdapterError (ValueError) before anything changes: the model, the pools and the loaded
        adapters are as they were.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"MultiLoRA.load_adapter: name={name!r} must be a non-empty string")
        af = as_adapter(source, adapter_name, allow_pickle=allow_pickle, strict=strict)
        f = fit(af, self.model, strict=strict, lora_dtype=self.dtype)
        modules = self._servable(name, af, f)
        with self._load_lock:
            # Every check before anything changes: the name, and each module's rank against its pool
            # (an existing pool's rows, or those a new pool would get).
            sizes = {}
            for mname, (A, _, _) in modules.items():
                existing = self.pool.modules.get(mname)
                if existing is None:
                    I, O = features(self._base_module(mname))
                    sizes[mname] = (I, O, self._rows_for(I, O))
                rows = existing.capacity if existing is not None else sizes[mname][2]
                if A.shape[0] > rows:
                    raise AdapterError(f"MultiLoRA.load_adapter({name!r}): {af.path}: module {mname!r} has rank "
                                       f"{A.shape[0]}, above the {rows} rows its pool holds (capacity_rows / "
                                       "capacity_bytes)", af.path)
            self.pool.check_new(name)
            # Allocation is the one step that can fail (out of memory): before anything is shared.
            new_pools = {m: ModulePool(m, I, O, rows, self.dtype, self.device) for m, (I, O, rows) in sizes.items()}
            wrapped = []
            try:
                self.pool.add_modules(new_pools)
                for mname in new_pools:
                    current = self.model.get_submodule(mname)
                    cls = ServedEmbedding if isinstance(current, nn.Embedding) else ServedLayer
                    set_module(self.model, mname, cls(current, mname, self))
                    wrapped.append((mname, current))
                self.pool.register(HostAdapter(name=name, modules=modules))
            except BaseException:
                for mname, original in reversed(wrapped):
                    set_module(self.model, mname, original)
                self.pool.remove_modules(list(new_pools))
                raise
        for message in f.notes:
            warnings.warn(f"MultiLoRA.load_adapter({name!r}): {message}", AdapterWarning, stacklevel=2)
        if pin:
            self.pool.pin(name)

    def load_adapters(self, sources: dict, *, progress: Optional[bool] = None) -> None:
        """Load several adapters ({name: source}), showing progress on a terminal."""
        import sys

        from tqdm.auto import tqdm

        disable = (not sys.stderr.isatty()) if progress is None else not progress
        for name, source in tqdm(sources.items(), desc="loading adapters", disable=disable):
            self.load_adapter(name, source)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; batches already running finish with it, later batches cannot name it, and
        a batch or pin waiting to make it resident fails (changing nothing)."""
        self._known(name, "unload_adapter")
        try:
            self.pool.remove(name)
        except KeyError:  # unloaded by another thread since the check
            self._known(name, "unload_adapter")
            raise

    def pin(self, name: str) -> None:
        """Keep an adapter resident on the device (never evicted). Making it resident may evict others,
        or raise PoolFullError when it cannot fit beside the pinned ones; then nothing changed."""
        self._known(name, "pin")
        try:
            self.pool.pin(name, True)
        except AdapterUnloaded as exc:
            raise KeyError(f"MultiLoRA.pin: {exc}") from None
        except KeyError:
            self._known(name, "pin")
            raise

    def unpin(self, name: str) -> None:
        self._known(name, "unpin")
        try:
            self.pool.pin(name, False)
        except KeyError:
            self._known(name, "unpin")
            raise

    @property
    def adapters(self) -> list:
        return sorted(self.pool.adapters)

    def resident_adapters(self) -> list:
        return self.pool.resident()

    def _known(self, name, what):
        if name not in self.pool.adapters:
            raise KeyError(f"MultiLoRA.{what}: no adapter named {name!r} is loaded "
                           f"(loaded: {', '.join(self.adapters) or 'none'})")

    def _servable(self, name: str, af, f) -> dict:
        """{module: (A [r, I], B [O, r], scale)} as fp32 host copies, or AdapterError for what the server
        cannot serve."""
        problems = []
        for mname, mw in f.modules.items():
            if mw.kind == "conv2d" or mw.lora_B_bias is not None:
                what = "a Conv2d target" if mw.kind == "conv2d" else "a LoRA bias (lora_bias)"
                problems.append(f"module {mname!r} has {what}; serving supports plain LoRA factors on Linear, Conv1D "
                                "and Embedding targets")
        plain = plain_state(self.model)
        for key, (t, kind) in f.extras.items():
            # The whole-embedding tensors PEFT saves beside an embedding target are the base model's own
            # (unless the vocabulary was resized): accepted when they equal the served model's.
            mine = plain.get(key) if kind == "embedding" else None
            if mine is None or not torch.equal(mine.detach().cpu().to(t.dtype), t):
                problems.append(f"it also holds {kind} tensor {key!r} (modules_to_save, trained biases or a resized "
                                "embedding); serving supports LoRA factors over the unchanged base model only")
        if problems:
            raise AdapterError([f"MultiLoRA.load_adapter({name!r}): {af.path}: {p}" for p in problems], af.path)
        return {m: (mw.lora_A.to("cpu", torch.float32), mw.lora_B.to("cpu", torch.float32), float(mw.scale))
                for m, mw in f.modules.items()}

    def _rows_for(self, I: int, O: int) -> int:
        if self._capacity_bytes is None:
            return self.pool.rows_per_module
        return max(1, self._capacity_bytes // ((I + O) * (torch.finfo(self.dtype).bits // 8)))

    def _base_module(self, name: str) -> nn.Module:
        m = self.model.get_submodule(name)
        return m.base_layer if isinstance(m, ServedLayer) else m

    # -- serving ----------------------------------------------------------------------------------

    def _batch(self) -> Optional[_Batch]:
        return getattr(self._local, "batch", None)

    @contextlib.contextmanager
    def _serving(self, adapter_names: Sequence, rows: int):
        if isinstance(adapter_names, (str, bytes)):
            raise ValueError(f"MultiLoRA: adapter_names={adapter_names!r} is a string; give one adapter name (or None) "
                             f"per row, e.g. adapter_names=[{adapter_names!r}] * {rows}")
        names = list(adapter_names)
        if len(names) != rows:
            raise ValueError(f"MultiLoRA: adapter_names has {len(names)} entries, the batch has {rows} rows "
                             "(one name, or None for the base model, per row)")
        wanted = set()
        for i, n in enumerate(names):
            if n is None:
                continue
            if n not in self.pool.adapters:
                raise ValueError(f"MultiLoRA: adapter_names[{i}]={n!r} is not loaded "
                                 f"(loaded: {', '.join(self.adapters) or 'none'})")
            wanted.add(n)
        try:
            snap = self.pool.acquire(wanted)
        except AdapterUnloaded as exc:  # by another thread, since the check above or while it waited
            raise ValueError(f"MultiLoRA: {exc}") from None
        try:
            # acquire() publishes every adapter it makes resident before it returns: all are in snap.
            batch = _Batch(snap, [snap.slots[n] if n is not None else -1 for n in names], self.pool.max_slots)
            previous = self._batch()
            self._local.batch = batch
            try:
                yield batch
            finally:
                self._local.batch = previous
        finally:
            self.pool.release(snap)

    def forward(self, *args, adapter_names: Sequence, **kwargs):
        """The model's forward with each row's adapter; every other argument goes to the model unchanged.

        adapter_names: one adapter name, or None for the base model, per row (a list, not a string).
        Raises ValueError (adapter_names malformed, or naming an adapter that is not loaded or was
        unloaded while the batch waited for room) or PoolFullError (the adapters cannot be resident
        together beside the pinned ones); then the server is exactly as it was."""
        rows = _batch_rows(args, kwargs)
        with self._serving(adapter_names, rows), torch.no_grad():
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence, **kwargs):
        """The model's generate() with each row's adapter applied at every step."""
        rows = _batch_rows(args, kwargs)
        with self._serving(adapter_names, rows), torch.no_grad():
            return self.model.generate(*args, **kwargs)


def _batch_rows(args, kwargs) -> int:
    for key in ("input_ids", "inputs_embeds", "x"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    for t in args:
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    raise ValueError("MultiLoRA: no input tensor (input_ids, inputs_embeds, or a positional tensor) to count rows")

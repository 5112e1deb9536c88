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

The same server trains adapters (pylora.serve.training): add_adapter / load_adapter(trainable=True)
make adapters whose factors are parameters of their own; in training mode with gradients enabled, a
forward builds the graph, every row training the adapter it names, through pylora.ops.lora_multi.

    server.add_adapter("carol", pylora.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([{"params": server.adapter_parameters("carol"), "lr": 1e-3}])
    server.train()
    logits = server(input_ids=ids, adapter_names=["carol", "carol", None]).logits
    loss, _ = pylora.per_adapter_loss(logits, ids, ["carol", "carol", None])
    loss.backward(); opt.step()
    server.save_adapter("carol", "out/carol")      # PEFT's format
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pylora import ops
from pylora.adapters import AdapterError, AdapterWarning, as_adapter, fit
from pylora.adapters.config_json import config_to_json
from pylora.adapters.format import PREFIX
from pylora.adapters.save import write_adapter
from pylora.adapters.source import Source
from pylora.nn.config import LoraConfig
from pylora.nn.inject import plain_modules, plain_state, set_module, target_names
from pylora.nn.kinds import features, module_kind
from pylora.nn.layers import LoraLayer
from pylora.nn.targets import with_default_targets
from pylora.serve.batch import segments, to_device
from pylora.serve.pool import AdapterPool, AdapterUnloaded, HostAdapter, ModulePool
from pylora.serve.training import TrainableAdapter, adapter_seed, draw_seed, module_draw


class _Batch:
    """What one forward's wrapped modules share: the snapshot, each row's pool slot, each row's trainable
    adapter, the device plans, and (training) the forward's dropout draw."""

    def __init__(self, snapshot, row_slots: list, num_slots: int, row_trainable: Optional[list] = None,
                 trainable: Optional[dict] = None, step_draw: int = 0, dropout: bool = False):
        self.snapshot = snapshot
        self.row_slots = row_slots
        self.num_slots = num_slots
        self.any = any(s >= 0 for s in row_slots)
        self.row_trainable = row_trainable or [None] * len(row_slots)
        self.trainable = trainable or {}  # name -> TrainableAdapter, those the batch names
        self.step_draw = step_draw
        self.dropout = dropout
        self._plans = {}

    def per_row(self, values: list, rows: int) -> list:
        B = len(values)
        if rows == B:
            return values
        if rows % B == 0:  # generate() with num_beams / num_return_sequences repeats each row in place
            k = rows // B
            return [s for s in values for _ in range(k)]
        raise ValueError(f"MultiLoRA: a wrapped module saw a batch of {rows} rows, but adapter_names has {B} "
                         "entries (one per row)")

    def slots_for(self, rows: int) -> list:
        return self.per_row(self.row_slots, rows)

    def plan(self, rows: int, tokens: int, device) -> tuple:
        key = (rows, tokens, str(device))
        plan = self._plans.get(key)
        if plan is None:
            if tokens % rows:
                raise ValueError(f"MultiLoRA: {tokens} tokens do not split into {rows} rows")
            seg_ptr, seg_slot = segments(self.slots_for(rows), tokens // rows, self.num_slots)
            plan = self._plans[key] = (to_device(seg_ptr, device), to_device(seg_slot, device))
        return plan

    def token_groups(self, rows: int, tokens: int, device, names: tuple) -> tuple:
        """lora_multi's (tok_ptr, tok_idx) for the trainable adapters `names`: each one's tokens, row by row."""
        key = (rows, tokens, str(device), names)
        groups = self._plans.get(key)
        if groups is None:
            if tokens % rows:
                raise ValueError(f"MultiLoRA: {tokens} tokens do not split into {rows} rows")
            L, per_row = tokens // rows, self.per_row(self.row_trainable, rows)
            tok_ptr, idx = [0], []
            for name in names:
                for r, n in enumerate(per_row):
                    if n == name:
                        idx.extend(range(r * L, (r + 1) * L))
                tok_ptr.append(len(idx))
            groups = self._plans[key] = (tok_ptr, to_device(torch.tensor(idx, dtype=torch.int64), device))
        return groups


class ServedLayer(nn.Module):
    """A module of the base model that adds, per token, the LoRA update of that token's adapter."""

    # The layer stands in for `base_layer`: a view of the model as it was looks through it.
    wraps_base_layer = True

    def __init__(self, base_layer: nn.Module, name: str, server: "MultiLoRA"):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        object.__setattr__(self, "_server", server)  # a plain reference, not a submodule (no cycle)
        self._key = next(_LAYER_KEYS)
        _LAYERS[self._key] = weakref.ref(self)

    def forward(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        if torch.compiler.is_compiling():
            # Under torch.compile the batch (a host-side plan, found per thread) stays out of the graph:
            # one opaque in-place op per layer, which applies the running batch when the graph runs.
            torch.ops.pylora_serve.apply_batch_(y, x, self._key)
            return y
        return self._apply_batch(x, y)

    def _apply_batch(self, x, y):
        """y plus each row's LoRA update for the running batch (y itself, updated in place, or a new tensor)."""
        batch = self._server._batch()
        if batch is None:
            return y
        if batch.any:
            tables = batch.snapshot.tables.get(self.name)
            if tables is not None and tables.slot_rows:
                y = self._add_lora(x, y, batch, tables)
        if batch.trainable:
            present = [(a, f) for a in batch.trainable.values() for f in (a.of(self.name),) if f is not None]
            if present:
                y = self._add_trainable(x, y, batch, present)
        return y

    def _add_trainable(self, x, y, batch, present):
        """The rows of trainable adapters: lora_multi over their own parameters (differentiable). present:
        (adapter, its factors in this module) pairs."""
        x2 = x.reshape(-1, x.shape[-1])
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x2.dtype
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        names = tuple(a.name for a, _ in present)
        tok_ptr, tok_idx = batch.token_groups(x.shape[0], x2.shape[0], x.device, names)
        ps = seeds = None  # no dropout outside a training batch: lora_multi's defaults
        if batch.dropout:
            draw = module_draw(batch.step_draw, self.name)
            ps = [a.dropout_p for a, _ in present]
            seeds = [adapter_seed(draw, a.salt) for a, _ in present]
        delta = ops.lora_multi(x2, [f.lora_A.to(dtype) for _, f in present], [f.lora_B.to(dtype) for _, f in present],
                               [a.scales[self.name] for a, _ in present], tok_ptr, tok_idx, dropout_p=ps, seeds=seeds,
                               check=False)
        return y + delta.view(*y.shape[:-1], delta.shape[-1]).to(y.dtype)

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


# The served layers by key, for the op below (a graph holds the key, an int, not the layer).
_LAYERS: dict[int, "weakref.ref[ServedLayer]"] = {}
_LAYER_KEYS = itertools.count()


@torch.library.custom_op("pylora_serve::apply_batch_", mutates_args=("y",))
def _apply_batch_op(y: torch.Tensor, x: torch.Tensor, key: int) -> None:
    """What a served layer adds under torch.compile: y += each row's LoRA update for the running batch,
    in place. Serving only: a training batch's graph needs the eager path's autograd."""
    layer = _LAYERS[key]()
    batch = layer._server._batch()
    if batch is not None and batch.dropout:
        raise RuntimeError("MultiLoRA: a compiled model serves (under torch.no_grad()); train adapters with the "
                           "model uncompiled")
    out = layer._apply_batch(x, y)
    if out is not y:
        y.copy_(out)


@_apply_batch_op.register_fake
def _(y, x, key):
    return None


class MultiLoRA(nn.Module):
    """Serves many LoRA adapters over one base model; see the module docstring.

    The base model's parameters are frozen (requires_grad=False): only adapters train.
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
        # The first floating-point parameter: a quantized base's weights may be integers (bitsandbytes).
        params = list(model.parameters())
        first = next((p for p in params if p.is_floating_point()), params[0])
        # One frozen base: only adapters train (and only their gradients cross the wire under DDP).
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.dtype = dtype or first.dtype
        self.device = torch.device(device) if device is not None else first.device
        self._capacity_bytes = capacity_bytes
        rows = capacity_rows if capacity_rows is not None else 1024
        self.pool = AdapterPool(max_adapters, rows, self.dtype, self.device)
        # Trainable adapters, registered as submodules (optimizers and DDP see their parameters); keyed
        # by an escaped name since a module name cannot hold ".".
        self.trainable_adapters = nn.ModuleDict()
        self._configs: dict[str, LoraConfig] = {}  # every adapter's config, for save_adapter
        self._local = threading.local()
        self._load_lock = threading.Lock()  # one load at a time: its checks hold until it is done
        self._last_train_batch: Optional[_Batch] = None

    # -- adapters ---------------------------------------------------------------------------------

    def load_adapter(self, name: str, source: Source, *, pin: bool = False, trainable: bool = False,
                     adapter_name: Optional[str] = None, allow_pickle: bool = False, strict: bool = True) -> None:
        """Load an adapter from a PEFT-format directory (its subfolder `adapter_name`), a pylora model in
        memory, or a pylora.adapters.Adapter. With trainable=True it becomes a trainable adapter (its
        factors float32 parameters, on the server's device) that continues training from the loaded values;
        it serves from those parameters and is always resident.

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
        f = fit(af, self.model, strict=strict, lora_dtype=torch.float32 if trainable else self.dtype)
        modules = self._servable(name, af, f)
        if trainable:
            if any(module_kind(self._base_module(m)) != "linear" for m in modules):
                bad = next(m for m in modules if module_kind(self._base_module(m)) != "linear")
                raise AdapterError(f"MultiLoRA.load_adapter({name!r}, trainable=True): {af.path}: module {bad!r} is a "
                                   f"{type(self._base_module(bad)).__name__}; trainable adapters support Linear and "
                                   "Conv1D targets", af.path)
            config = _config_of(f.config, list(modules))
            adapter = TrainableAdapter(
                name, config, {m: (A.to(self.device), B.to(self.device)) for m, (A, B, _) in modules.items()},
                {m: s for m, (_, _, s) in modules.items()})
            self._register_trainable(adapter)
            for message in f.notes:
                warnings.warn(f"MultiLoRA.load_adapter({name!r}): {message}", AdapterWarning, stacklevel=2)
            return
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
            self._check_new(name)
            # Allocation is the one step that can fail (out of memory): before anything is shared.
            new_pools = {m: ModulePool(m, I, O, rows, self.dtype, self.device) for m, (I, O, rows) in sizes.items()}
            wrapped = []
            try:
                self.pool.add_modules(new_pools)
                for mname in new_pools:
                    current = self.model.get_submodule(mname)
                    if isinstance(current, ServedLayer):  # wrapped for a trainable adapter already
                        continue
                    cls = ServedEmbedding if isinstance(current, nn.Embedding) else ServedLayer
                    set_module(self.model, mname, cls(current, mname, self))
                    wrapped.append((mname, current))
                self.pool.register(HostAdapter(name=name, modules=modules))
                self._configs[name] = _config_of(f.config, list(modules))
            except BaseException:
                for mname, original in reversed(wrapped):
                    set_module(self.model, mname, original)
                self.pool.remove_modules(list(new_pools))
                raise
        for message in f.notes:
            warnings.warn(f"MultiLoRA.load_adapter({name!r}): {message}", AdapterWarning, stacklevel=2)
        if pin:
            self.pin(name)

    def load_adapters(self, sources: dict, *, progress: Optional[bool] = None) -> None:
        """Load several adapters ({name: source}), showing progress on a terminal."""
        import sys

        from tqdm.auto import tqdm

        disable = (not sys.stderr.isatty()) if progress is None else not progress
        for name, source in tqdm(sources.items(), desc="loading adapters", disable=disable):
            self.load_adapter(name, source)

    def add_adapter(self, name: str, config: LoraConfig, *, salt: Optional[int] = None,
                    dtype: torch.dtype = torch.float32) -> None:
        """A fresh trainable adapter: PEFT's initialisation (config.init_lora_weights) of factors for every
        module `config` targets in the base model (Linear and Conv1D), `dtype` parameters on the server's
        device (float32 by default, as PEFT keeps them). `salt` keys its dropout masks (default: from its
        name, so the same name draws the same masks in every run). Raises ValueError before anything
        changes: an existing name, a config that targets nothing or a module that is not Linear/Conv1D, or
        options the server does not train (modules_to_save, bias, lora_bias, use_dora)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"MultiLoRA.add_adapter: name={name!r} must be a non-empty string")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"MultiLoRA.add_adapter: config must be a pylora.LoraConfig, got {type(config).__name__}")
        for field, off in (("modules_to_save", None), ("bias", "none"), ("lora_bias", False)):
            if getattr(config, field) not in (off, [] if off is None else off):
                raise ValueError(f"MultiLoRA.add_adapter({name!r}): {field}={getattr(config, field)!r} is not "
                                 f"supported; trainable adapters hold LoRA factors only ({field} must be {off!r})")
        config = with_default_targets(self.model, config, caller=f"MultiLoRA.add_adapter({name!r})")
        targets = target_names(self.model, config)
        if not targets:
            raise ValueError(f"MultiLoRA.add_adapter({name!r}): target_modules={config.target_modules!r} matches no "
                             f"module of {type(self.model).__name__}")
        modules = plain_modules(self.model)
        for m in targets:
            if module_kind(modules[m]) != "linear":
                raise ValueError(f"MultiLoRA.add_adapter({name!r}): module {m!r} is a {type(modules[m]).__name__}; "
                                 "trainable adapters support Linear and Conv1D targets")
        adapter = TrainableAdapter.fresh(name, _config_of(config, targets), {m: features(modules[m]) for m in targets},
                                         dtype=dtype, device=self.device, salt=salt)
        self._register_trainable(adapter)

    def _register_trainable(self, adapter: TrainableAdapter) -> None:
        with self._load_lock:
            self._check_new(adapter.name)
            wrapped = []
            try:
                for m in adapter.modules_:
                    current = self.model.get_submodule(m)
                    if not isinstance(current, ServedLayer):
                        set_module(self.model, m, ServedLayer(current, m, self))
                        wrapped.append((m, current))
                self.trainable_adapters[_escape(adapter.name)] = adapter
                self._configs[adapter.name] = adapter.config
            except BaseException:
                for m, original in reversed(wrapped):
                    set_module(self.model, m, original)
                raise

    def _check_new(self, name: str) -> None:
        if _escape(name) in self.trainable_adapters:
            raise ValueError(f"MultiLoRA: an adapter named {name!r} is already loaded; unload it first")
        self.pool.check_new(name)

    def _trainable(self, name: str) -> Optional[TrainableAdapter]:
        key = _escape(name) if isinstance(name, str) else None
        return self.trainable_adapters[key] if key in self.trainable_adapters else None

    def is_trainable(self, name: str) -> bool:
        self._known(name, "is_trainable")
        return self._trainable(name) is not None

    def adapter_parameters(self, name: str) -> list:
        """The trainable tensors of adapter `name` (each module's lora_A and lora_B), for an optimizer's param
        group: each adapter its own group, with its own learning rate and schedule."""
        adapter = self._trainable(name)
        if adapter is None:
            self._known(name, "adapter_parameters")
            raise ValueError(f"MultiLoRA.adapter_parameters: adapter {name!r} is not trainable (add_adapter, or "
                             "load_adapter(..., trainable=True))")
        return list(adapter.parameters())

    def save_adapter(self, name: str, directory) -> str:
        """Write adapter `name` in PEFT's format (adapter_config.json and adapter_model.safetensors) to
        `directory`: a trainable adapter's current parameters, or a loaded adapter's factors. PEFT and
        pylora.load_adapter load it; its outputs equal serving it here. Returns the directory."""
        self._known(name, "save_adapter")
        adapter = self._trainable(name)
        if adapter is not None:
            factors = {m: (adapter.of(m).lora_A, adapter.of(m).lora_B) for m in adapter.modules_}
        else:
            factors = {m: (A, B) for m, (A, B, _) in self.pool.adapters[name].modules.items()}
        tensors = {}
        for m, (A, B) in factors.items():
            for suffix, t in (("lora_A.weight", A), ("lora_B.weight", B)):
                t = t.detach().to("cpu", copy=True).contiguous()
                if not bool(torch.isfinite(t).all()):
                    raise AdapterError(f"MultiLoRA.save_adapter({name!r}): {m}.{suffix} holds non-finite values; an "
                                       "adapter file must be finite")
                tensors[f"{PREFIX}{m}.{suffix}"] = t
        model = self.model
        config = config_to_json(self._configs[name], base_model_name_or_path=model.__dict__.get("name_or_path"),
                                auto_mapping={"base_model_class": type(model).__name__,
                                              "parent_library": type(model).__module__})
        write_adapter(directory, config, tensors)
        return str(directory)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; batches already running finish with it, later batches cannot name it, and
        a batch or pin waiting to make it resident fails (changing nothing)."""
        if self._trainable(name) is not None:
            with self._load_lock:
                del self.trainable_adapters[_escape(name)]
                self._configs.pop(name, None)
            return
        self._known(name, "unload_adapter")
        try:
            self.pool.remove(name)
        except KeyError:  # unloaded by another thread since the check
            self._known(name, "unload_adapter")
            raise
        self._configs.pop(name, None)

    def pin(self, name: str) -> None:
        """Keep an adapter resident on the device (never evicted). Making it resident may evict others,
        or raise PoolFullError when it cannot fit beside the pinned ones; then nothing changed. A trainable
        adapter is resident while it is loaded: pinning or unpinning it changes nothing."""
        if self._trainable(name) is not None:
            return
        self._known(name, "pin")
        try:
            self.pool.pin(name, True)
        except AdapterUnloaded as exc:
            raise KeyError(f"MultiLoRA.pin: {exc}") from None
        except KeyError:
            self._known(name, "pin")
            raise

    def unpin(self, name: str) -> None:
        if self._trainable(name) is not None:
            return
        self._known(name, "unpin")
        try:
            self.pool.pin(name, False)
        except KeyError:
            self._known(name, "unpin")
            raise

    @property
    def adapters(self) -> list:
        return sorted(list(self.pool.adapters) + [a.name for a in self.trainable_adapters.values()])

    def resident_adapters(self) -> list:
        """The adapters whose factors are on the device now: the pool's resident ones and every trainable one."""
        return sorted(self.pool.resident() + [a.name for a in self.trainable_adapters.values()])

    def _known(self, name, what):
        if name not in self.pool.adapters and self._trainable(name) is None:
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
        batch = getattr(self._local, "batch", None)
        if batch is None and self.training and torch.is_grad_enabled():
            # A forward recomputed by activation checkpointing during backward, outside the serving
            # context (and, on a GPU, on autograd's own thread): the last training batch it belongs to.
            batch = self._last_train_batch
        return batch

    def train(self, mode: bool = True):
        self._last_train_batch = None
        return super().train(mode)

    @contextlib.contextmanager
    def _serving(self, adapter_names: Sequence, rows: int, training: bool = False):
        """The batch of one forward, held while it runs. training (train mode, gradients enabled) makes it a
        training batch when it names a trainable adapter: then it may name no frozen one."""
        if isinstance(adapter_names, (str, bytes)):
            raise ValueError(f"MultiLoRA: adapter_names={adapter_names!r} is a string; give one adapter name (or None) "
                             f"per row, e.g. adapter_names=[{adapter_names!r}] * {rows}")
        names = list(adapter_names)
        if len(names) != rows:
            raise ValueError(f"MultiLoRA: adapter_names has {len(names)} entries, the batch has {rows} rows "
                             "(one name, or None for the base model, per row)")
        wanted, trainable = set(), {}
        for i, n in enumerate(names):
            if n is None:
                continue
            if n in self.pool.adapters:  # serving; a name is in the pool or trainable, never both
                wanted.add(n)
                continue
            adapter = self._trainable(n) if self.trainable_adapters else None
            if adapter is None:
                raise ValueError(f"MultiLoRA: adapter_names[{i}]={n!r} is not loaded "
                                 f"(loaded: {', '.join(self.adapters) or 'none'})")
            trainable[n] = adapter
        if training and trainable and wanted:
            i, n = next((i, n) for i, n in enumerate(names) if n in wanted)
            raise ValueError(f"MultiLoRA: adapter_names[{i}]={n!r} is not trainable, and this is a training batch "
                             f"(train mode, gradients enabled, trainable adapters named: "
                             f"{', '.join(sorted(trainable))}): a training batch names trainable adapters or None; "
                             "serve the others under torch.no_grad() or after server.eval()")
        training = training and bool(trainable)
        try:
            snap = self.pool.acquire(wanted)
        except AdapterUnloaded as exc:  # by another thread, since the check above or while it waited
            raise ValueError(f"MultiLoRA: {exc}") from None
        try:
            # acquire() publishes every adapter it makes resident before it returns: all are in snap.
            batch = _Batch(snap, [snap.slots[n] if n in wanted else -1 for n in names], self.pool.max_slots,
                           row_trainable=[n if n in trainable else None for n in names], trainable=trainable,
                           step_draw=draw_seed() if training else 0, dropout=training)
            previous = self._batch()
            self._local.batch = batch
            if training:
                self._last_train_batch = batch
            try:
                yield batch
            finally:
                self._local.batch = previous
        finally:
            self.pool.release(snap)

    def forward(self, *args, adapter_names: Sequence, **kwargs):
        """The model's forward with each row's adapter; every other argument goes to the model unchanged.
        In train mode with gradients enabled, a batch that names trainable adapters builds the graph: each
        row trains the adapter it names, with its dropout; every other batch runs under torch.no_grad().

        adapter_names: one adapter name, or None for the base model, per row (a list, not a string).
        Raises ValueError (adapter_names malformed, or naming an adapter that is not loaded or was
        unloaded while the batch waited for room) or PoolFullError (the adapters cannot be resident
        together beside the pinned ones); then the server is exactly as it was."""
        rows = _batch_rows(args, kwargs)
        with self._serving(adapter_names, rows, training=self.training and torch.is_grad_enabled()) as batch:
            if batch.dropout:  # a training batch
                return self.model(*args, **kwargs)
            with torch.no_grad():
                return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence, **kwargs):
        """The model's generate() with each row's adapter applied at every step."""
        rows = _batch_rows(args, kwargs)
        with self._serving(adapter_names, rows), torch.no_grad():
            return self.model.generate(*args, **kwargs)


def _escape(name: str) -> str:
    """An adapter name as a module key (no "."), one to one."""
    return name.replace("%", "%25").replace(".", "%2E")


def _config_of(config: LoraConfig, modules: list) -> LoraConfig:
    """The config a saved adapter carries: target_modules the list of modules it wraps (as PEFT writes
    it), pattern keys kept only where they select one of them."""
    import copy

    cfg = copy.deepcopy(config)
    cfg.target_modules = sorted(modules)
    cfg.exclude_modules = cfg.modules_to_save = None
    cfg.layers_to_transform = cfg.layers_pattern = None
    for pname in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(cfg, pname)
        for key in list(pattern):
            if not any(cfg.pattern_key([key], m, pname) for m in modules):
                del pattern[key]
    return cfg


def _batch_rows(args, kwargs) -> int:
    for key in ("input_ids", "inputs_embeds", "x"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    for t in args:
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    raise ValueError("MultiLoRA: no input tensor (input_ids, inputs_embeds, or a positional tensor) to count rows")

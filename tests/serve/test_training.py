"""Training many adapters in one batch with MultiLoRA: every row trains the adapter it names.

Each adapter's parameters after several AdamW steps equal those of training it alone on its own rows
(with pylora's single-adapter layers and with PEFT), on a tiny Llama and a GPT-2, for adapters of
different ranks, alphas, rsLoRA and targets; neighbours coming and going change no adapter's trajectory
(dropout included); rows of no adapter contribute nothing; bad batches change nothing; saved adapters
load in PEFT and pylora; activation checkpointing and bf16 autocast train as plain fp32 does."""
import warnings

import pytest
import torch

import pylora
from pylora.serve.training import per_adapter_loss
from tests.helpers import rel_err
from tests.models import VOCAB, gpt2, llama

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
L = 12  # tokens per row

# name -> (builder, LoraConfig fields): ranks 1 to 16, alphas, rsLoRA, different targets.
ADAPTERS = {
    "llama": {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=1, lora_alpha=3, target_modules=["o_proj", "down_proj"]),
        "c": dict(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"], use_rslora=True),
        "d": dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"gate_proj": 2}),
    },
    "gpt2": {
        "a": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
        "b": dict(r=2, lora_alpha=2, target_modules=["c_proj"], fan_in_fan_out=True),
        "c": dict(r=8, lora_alpha=4, target_modules=["c_fc", "c_attn"], fan_in_fan_out=True, use_rslora=True),
        "d": dict(r=3, lora_alpha=6, target_modules=["c_fc"], fan_in_fan_out=True),
    },
}
BUILD = {"llama": llama, "gpt2": gpt2}


def initial_adapters(kind, tmp_path, names, dropout=0.0):
    """Each adapter's starting point as PEFT files: random A and B (non-zero B: every gradient matters)."""
    dirs = {}
    for i, name in enumerate(names):
        fields = dict(ADAPTERS[kind][name], lora_dropout=dropout)
        model = pylora.inject(BUILD[kind](), pylora.LoraConfig(init_lora_weights=False, **fields))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, layer in pylora.lora_layers(model):
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
        dirs[name] = pylora.save_adapter(model, tmp_path / f"{kind}-{name}")
    return dirs


def rows(name, step, n=2):
    g = torch.Generator().manual_seed(hash((name, step)) % 2**31)
    return torch.randint(0, VOCAB, (n, L), generator=g)


def joint_batch(names, step, extra_none=1):
    """Rows of every adapter interleaved (each adapter's own rows in their order), and rows of none."""
    parts = {n: rows(n, step) for n in names}
    ids, labels = [], []
    for i in range(2):
        for n in names:
            ids.append(parts[n][i])
            labels.append(n)
        for j in range(extra_none):
            ids.append(rows("none", step * 10 + i * 3 + j, 1)[0])
            labels.append(None)
    return torch.stack(ids), labels


# Each adapter its own param group with its own learning rate. SGD with momentum: AdamW's per-element
# normalisation amplifies rounding differences where g and sqrt(v) nearly cancel (gradients equal within
# 5e-7 drift 3e-5 to 2e-4 apart in three AdamW steps, depending on the BLAS kernel a thread count picks),
# which says nothing about the gradients; AdamW itself is exercised in test_adamw_param_groups.
LR = {"a": 1e-2, "b": 2e-2, "c": 5e-3, "d": 1.5e-2}
OPTIMIZERS = {"adamw": lambda groups: torch.optim.AdamW(groups),
              "sgd": lambda groups: torch.optim.SGD(groups, momentum=0.9)}


def train_joint(kind, dirs, schedule, steps, opt_name="sgd"):
    """schedule(step) -> the adapters in that step's batch; adapters are added when first scheduled and
    removed when no longer (their final parameters kept)."""
    server = pylora.MultiLoRA(BUILD[kind]())
    opt, final = None, {}
    groups = {}
    for step in range(steps):
        names = schedule(step)
        for n in names:
            if n not in server.adapters:
                server.load_adapter(n, dirs[n], trainable=True)
                groups[n] = {"params": server.adapter_parameters(n), "lr": LR[n]}
        for n in list(groups):
            if n not in names:
                final[n] = snapshot(server, n)
                server.unload_adapter(n)
                del groups[n]
        opt = OPTIMIZERS[opt_name](list(groups.values())) if opt is None else rebuild(opt, groups, opt_name)
        server.train()
        ids, labels = joint_batch(names, step)
        logits = server(input_ids=ids, adapter_names=labels).logits
        loss, _ = per_adapter_loss(logits, ids, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n in groups:
        final[n] = snapshot(server, n)
    return final, server


def rebuild(opt, groups, opt_name):
    """An optimizer over the current adapters, each keeping its state (what a training loop does when one
    job ends and another starts)."""
    state = {p: opt.state[p] for g in opt.param_groups for p in g["params"] if p in opt.state}
    new = OPTIMIZERS[opt_name](list(groups.values()))
    for g in new.param_groups:
        for p in g["params"]:
            if p in state:
                new.state[p] = state[p]
    return new


def snapshot(server, name):
    adapter = server._trainable(name)
    return {m: (adapter.of(m).lora_A.detach().clone(), adapter.of(m).lora_B.detach().clone())
            for m in adapter.modules_}


def train_alone(model, name, steps, opt_name):
    """Trains one adapter's model (pylora's or PEFT's) on that adapter's rows alone."""
    model.train()
    opt = OPTIMIZERS[opt_name]([{"params": [p for p in model.parameters() if p.requires_grad], "lr": LR[name]}])
    for step in range(steps):
        ids = rows(name, step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_alone_pylora(kind, directory, name, steps, opt_name="sgd"):
    model = pylora.load_adapter(BUILD[kind](), directory)
    pylora.mark_only_lora_trainable(model)
    train_alone(model, name, steps, opt_name)
    return {n: (layer.lora_A.detach(), layer.lora_B.detach()) for n, layer in pylora.lora_layers(model)}


def train_alone_peft(kind, directory, name, steps, opt_name="sgd"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(BUILD[kind](), str(directory), is_trainable=True)
    train_alone(pm, name, steps, opt_name)
    out = {}
    for n, module in pm.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            out[n] = (module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach())
    return out


def assert_same_factors(got, want, what, rel=1e-5):
    assert got.keys() == want.keys(), what
    for m in got:
        for x, y in zip(got[m], want[m]):
            assert rel_err(x, y) < rel, (what, m, rel_err(x, y))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_joint_training_equals_training_each_alone(kind, tmp_path):
    names = list(ADAPTERS[kind])
    dirs = initial_adapters(kind, tmp_path, names)
    steps = 3
    joint, _ = train_joint(kind, dirs, lambda step: names, steps)
    for name in names:
        start = pylora.adapters.read_adapter(dirs[name])
        moved = max(rel_err(joint[name][m][1], start.modules[m].lora_B) for m in joint[name])
        assert moved > 1e-3, f"{name} did not train"
        assert_same_factors(joint[name], train_alone_pylora(kind, dirs[name], name, steps), f"{kind}/{name} pylora")
        assert_same_factors(joint[name], train_alone_peft(kind, dirs[name], name, steps), f"{kind}/{name} PEFT")


def test_adamw_param_groups(tmp_path):
    """AdamW with each adapter its own param group and learning rate: the same steps as training each
    alone with AdamW, within the rounding AdamW amplifies."""
    dirs = initial_adapters("llama", tmp_path, ["a", "b"])
    joint, _ = train_joint("llama", dirs, lambda step: ["a", "b"], 3, "adamw")
    for name in ("a", "b"):
        assert_same_factors(joint[name], train_alone_pylora("llama", dirs[name], name, 3, "adamw"), name, rel=1e-3)


def test_neighbours_coming_and_going_change_no_trajectory(tmp_path):
    """a and b train throughout; c leaves after two steps and d arrives: a's and b's parameters (with
    dropout, so their masks too) equal those of a run with a and b alone."""
    dirs = initial_adapters("llama", tmp_path, ["a", "b", "c", "d"], dropout=0.2)
    steps = 4
    torch.manual_seed(7)
    churn, _ = train_joint("llama", dirs, lambda s: ["a", "b", "c"] if s < 2 else ["a", "d", "b"], steps)
    torch.manual_seed(7)
    steady, _ = train_joint("llama", dirs, lambda s: ["a", "b"], steps)
    for name in ("a", "b"):
        assert_same_factors(churn[name], steady[name], name)


def test_rows_of_no_adapter_give_no_gradient(tmp_path):
    dirs = initial_adapters("llama", tmp_path, ["a", "b"])
    server = pylora.MultiLoRA(llama())
    for n in ("a", "b"):
        server.load_adapter(n, dirs[n], trainable=True)
    server.train()
    params = server.adapter_parameters("a") + server.adapter_parameters("b")

    def grads(extra_none):
        torch.manual_seed(3)
        ids, names = joint_batch(["a", "b"], 0, extra_none=extra_none)
        loss, _ = per_adapter_loss(server(input_ids=ids, adapter_names=names).logits, ids, names)
        got = torch.autograd.grad(loss, params)
        return got, ids, names

    without, _, _ = grads(0)
    with_none, ids, names = grads(3)
    for x, y in zip(with_none, without):
        assert rel_err(x, y) < 1e-6
    # The rows of no adapter, alone, reach no adapter's parameters.
    logits = server(input_ids=ids, adapter_names=names).logits
    none_rows = [i for i, n in enumerate(names) if n is None]
    loss = torch.nn.functional.cross_entropy(logits[none_rows].reshape(-1, VOCAB), ids[none_rows].reshape(-1))
    assert all(g is None or torch.count_nonzero(g) == 0 for g in torch.autograd.grad(loss, params, allow_unused=True))


def test_bad_training_batches_change_nothing(tmp_path):
    dirs = initial_adapters("llama", tmp_path, ["a", "b"])
    server = pylora.MultiLoRA(llama())
    server.load_adapter("a", dirs["a"], trainable=True)
    server.load_adapter("frozen", dirs["b"])
    server.add_adapter("gone", pylora.LoraConfig(r=2, target_modules=["q_proj"]))
    server.unload_adapter("gone")
    server.train()
    before = {k: v.clone() for k, v in server.state_dict().items()}
    rng = torch.random.get_rng_state()
    ids = rows("x", 0, n=3)
    for names, message in [(["a", "nobody", None], r"adapter_names\[1\]='nobody' is not loaded"),
                           (["a", None], r"adapter_names has 2 entries, the batch has 3 rows"),
                           ("a", r"adapter_names='a' is a string"),
                           (["a", "frozen", None], r"adapter_names\[1\]='frozen' is not trainable, and this is a "
                                                   r"training batch \(train mode, gradients enabled, trainable "
                                                   r"adapters named: a\)"),
                           (["gone", None, None], r"adapter_names\[0\]='gone' is not loaded")]:
        with pytest.raises(ValueError, match=message):
            server(input_ids=ids, adapter_names=names)
    assert all(p.grad is None for p in server.adapter_parameters("a"))
    assert all(torch.equal(v, before[k]) for k, v in server.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng)
    with pytest.raises(ValueError, match=r"adapter 'frozen' is not trainable"):
        server.adapter_parameters("frozen")
    with torch.no_grad():  # serving the frozen adapter beside the trainable one is fine
        server(input_ids=ids, adapter_names=["a", "frozen", None])
    server(input_ids=ids, adapter_names=["frozen", None, None])  # and a batch of frozen ones is served, no graph


def test_add_adapter_refusals_change_nothing():
    server = pylora.MultiLoRA(llama())
    server.add_adapter("a", pylora.LoraConfig(r=2, target_modules=["q_proj"]))
    structure = [(n, type(m)) for n, m in server.named_modules()]
    for name, cfg, message in [
            ("a", pylora.LoraConfig(r=2, target_modules=["v_proj"]), r"an adapter named 'a' is already loaded"),
            ("b", pylora.LoraConfig(r=2, target_modules=["nothing"]), r"target_modules=\['nothing'\] matches no module"),
            ("b", pylora.LoraConfig(r=2, target_modules=["embed_tokens"]),
             r"module 'model\.embed_tokens' is a Embedding; trainable adapters support Linear and Conv1D"),
            ("b", pylora.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]),
             r"modules_to_save=\['lm_head'\] is not supported"),
            ("b", pylora.LoraConfig(r=2, target_modules=["v_proj"], bias="all"), r"bias='all' is not supported")]:
        with pytest.raises(ValueError, match=message):
            server.add_adapter(name, cfg)
    assert [(n, type(m)) for n, m in server.named_modules()] == structure and server.adapters == ["a"]


def test_fresh_adapters_start_as_peft_starts(tmp_path):
    """add_adapter's initialisation is PEFT's: A like nn.Linear's init, B zero (the model is the base)."""
    server = pylora.MultiLoRA(llama())
    torch.manual_seed(5)
    server.add_adapter("a", pylora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = server._trainable("a")
    assert all(torch.count_nonzero(adapter.of(m).lora_B) == 0 for m in adapter.modules_)
    assert all(torch.count_nonzero(adapter.of(m).lora_A) > 0 for m in adapter.modules_)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    A_peft = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert A_peft.shape == adapter.of("model.layers.0.self_attn.q_proj").lora_A.shape
    bound = 1 / A_peft.shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(I), 1/sqrt(I))
    assert adapter.of("model.layers.0.self_attn.q_proj").lora_A.abs().max() <= bound


def test_saved_adapters_load_in_peft_and_pylora_and_serve_alike(tmp_path):
    dirs = initial_adapters("llama", tmp_path, ["a", "c"])
    joint, server = train_joint("llama", dirs, lambda s: ["a", "c"], 2)
    server.eval()
    ids = rows("probe", 0, n=2)
    for name in ("a", "c"):
        out = server.save_adapter(name, tmp_path / f"saved-{name}")
        served = server(input_ids=ids, adapter_names=[name, name]).logits
        model = pylora.load_adapter(llama(), out)
        with torch.no_grad():
            assert rel_err(model(input_ids=ids).logits, served) < 1e-5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.PeftModel.from_pretrained(llama(), str(out)).eval()
        with torch.no_grad():
            assert rel_err(pm(input_ids=ids).logits, served) < 1e-5
        # and a frozen copy served from the pool gives the same rows
        server.load_adapter(f"{name}-frozen", out)
        assert rel_err(server(input_ids=ids, adapter_names=[f"{name}-frozen"] * 2).logits, served) < 1e-5


def test_activation_checkpointing_trains_as_without(tmp_path):
    """The recomputed forward (during backward, outside the serving call) finds its batch and its dropout
    seeds: the same gradients as without checkpointing."""
    dirs = initial_adapters("llama", tmp_path, ["a", "b"], dropout=0.3)

    def grads(checkpointing):
        server = pylora.MultiLoRA(llama())
        for n in ("a", "b"):
            server.load_adapter(n, dirs[n], trainable=True)
        if checkpointing:
            server.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        server.train()
        torch.manual_seed(11)
        ids, names = joint_batch(["a", "b"], 0)
        loss, _ = per_adapter_loss(server(input_ids=ids, adapter_names=names).logits, ids, names)
        return torch.autograd.grad(loss, server.adapter_parameters("a") + server.adapter_parameters("b"))

    for x, y in zip(grads(True), grads(False)):
        assert rel_err(x, y) < 1e-6


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    dirs = initial_adapters("llama", tmp_path, ["a", "b"])

    def grads(autocast):
        server = pylora.MultiLoRA(llama())
        for n in ("a", "b"):
            server.load_adapter(n, dirs[n], trainable=True)
        server.train()
        ids, names = joint_batch(["a", "b"], 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = per_adapter_loss(server(input_ids=ids, adapter_names=names).logits, ids, names)
        params = server.adapter_parameters("a") + server.adapter_parameters("b")
        got = torch.autograd.grad(loss, params)
        assert all(p.dtype == torch.float32 for p in params)  # the factors stay float32
        return got

    for x, y in zip(grads(True), grads(False)):
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
        assert rel_err(x, y) < 0.1


def test_per_adapter_loss_is_the_sum_of_each_adapters_mean():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 6, 10), torch.randint(0, 10, (4, 6))
    labels[1, 3:] = -100
    names = ["x", "y", None, "x"]
    total, parts = per_adapter_loss(logits, labels, names)
    ce = lambda rows: torch.nn.functional.cross_entropy(  # noqa: E731
        logits[rows, :-1].reshape(-1, 10), labels[rows, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(parts["x"], ce([0, 3])) and torch.allclose(parts["y"], ce([1]))
    assert torch.allclose(total, parts["x"] + parts["y"])
    with pytest.raises(ValueError, match=r"adapter_names='x' must be a sequence"):
        per_adapter_loss(logits, labels, "x")


def test_pin_and_unpin_leave_a_trainable_adapter_as_it_is():
    """A trainable adapter is resident while loaded: pin and unpin change nothing and do not raise; an
    unknown name is still refused by name."""
    server = pylora.MultiLoRA(llama())
    server.add_adapter("carol", pylora.LoraConfig(r=2, target_modules=["q_proj"]))
    server.pin("carol")
    server.unpin("carol")
    assert server.resident_adapters() == ["carol"] and server.adapters == ["carol"]
    for call in (server.pin, server.unpin):
        with pytest.raises(KeyError, match="no adapter named 'dave' is loaded"):
            call("dave")

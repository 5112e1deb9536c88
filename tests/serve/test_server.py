"""MultiLoRA: each row's output equals the base model with only that row's adapter merged, equals
PEFT's mixed batch, decode with a KV cache equals the full forward; capacity, LRU and pinning;
loading and unloading while another thread serves."""
import copy
import random
import threading

import pytest
import torch

import pylora
from tests.models import copy_lora_into_peft, ids, randomize_lora, tiny_gpt2, tiny_llama

HIDDEN, VOCAB = 96, 128

# name -> (targets, r, alpha, use_rslora, rank_pattern)
ADAPTERS = {
    "r1_q": (["q_proj"], 1, 2, False, {}),
    "r2_all": ("all-linear", 2, 4, False, {}),
    "r4_qv": (["q_proj", "v_proj"], 4, 8, True, {}),
    "r8_mlp": (["gate_proj", "up_proj", "down_proj"], 8, 4, False, {}),
    "r16_all": ("all-linear", 16, 32, False, {"down_proj": 3}),
    "r32_o": (["o_proj", "k_proj"], 32, 16, False, {}),
    "r64_v": (["v_proj"], 64, 64, False, {}),
    "r256_qv": (["q_proj", "v_proj"], 256, 128, False, {"v_proj": 7}),
    "emb": (["embed_tokens", "q_proj"], 4, 8, False, {}),
}


def make_base():
    return tiny_llama(seed=0, vocab=VOCAB, hidden=HIDDEN)


def make_adapter(name, seed):
    targets, r, alpha, rs, rp = ADAPTERS[name]
    model = make_base()
    pylora.inject(model, pylora.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rs,
                                           rank_pattern=rp))
    return randomize_lora(model, seed=seed, std=0.2 / (1 + r ** 0.5))


@pytest.fixture(scope="module")
def adapters():
    return {name: make_adapter(name, i) for i, name in enumerate(ADAPTERS)}


@pytest.fixture(scope="module")
def expected_logits(adapters):
    """Logits of each adapter merged into its own copy of the base, on the batch `batch_ids`."""
    out = {None: make_base()(batch_ids()).logits.detach()}
    for name, model in adapters.items():
        merged = pylora.merge_and_unload(copy.deepcopy(model))
        with torch.no_grad():
            out[name] = merged(batch_ids()).logits
    return out


def batch_ids(rows=12, seq=10):
    return ids(batch=rows, seq=seq, vocab=VOCAB, seed=5)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def server_with(adapters, **kw):
    server = pylora.MultiLoRA(make_base(), **kw)
    for name, model in adapters.items():
        server.load_adapter(name, model)
    return server


def test_each_row_equals_its_adapter_merged(adapters, expected_logits):
    server = server_with(adapters)
    names = list(ADAPTERS) + [None, None, "r16_all"]
    random.Random(0).shuffle(names)
    x = batch_ids(rows=len(names))
    out = server(input_ids=x, adapter_names=names).logits
    for row, name in enumerate(names):
        assert rel_err(out[row], expected_logits[name][row]) < 1e-5, (row, name)
    # One row alone equals the same row in the batch.
    for row in (0, 5):
        alone = server(input_ids=x[row:row + 1], adapter_names=[names[row]]).logits
        assert rel_err(alone[0], out[row]) < 1e-5


def test_all_rows_decode_one_token_each(adapters, expected_logits):
    server = server_with(adapters)
    names = list(ADAPTERS) + [None, "r2_all", "r2_all"]
    x = batch_ids(rows=len(names))[:, :1]  # one token per row: every segment has length 1
    out = server(input_ids=x, adapter_names=names).logits
    for row, name in enumerate(names):
        ref = expected_logits[name][row, :1]
        assert rel_err(out[row], ref) < 1e-5, name


def test_matches_peft_mixed_batch(adapters, tmp_path):
    peft = pytest.importorskip("peft")
    chosen = ["r1_q", "r4_qv", "r16_all", "r64_v"]
    base = make_base()
    first = chosen[0]
    targets, r, alpha, rs, rp = ADAPTERS[first]
    pm = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rs,
                                                   rank_pattern=rp), adapter_name=first)
    for name in chosen[1:]:
        targets, r, alpha, rs, rp = ADAPTERS[name]
        pm.add_adapter(name, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rs,
                                             rank_pattern=rp))
    for name in chosen:
        copy_lora_into_peft(adapters[name], pm, adapter=name)
    pm.eval()
    names = ["r4_qv", None, "r1_q", "r64_v", "r16_all", None, "r4_qv"]
    x = batch_ids(rows=len(names))
    with torch.no_grad():
        want = pm(input_ids=x, adapter_names=[n or "__base__" for n in names]).logits
    server = server_with({n: adapters[n] for n in chosen})
    got = server(input_ids=x, adapter_names=names).logits
    assert rel_err(got, want) < 1e-5


def test_kv_cache_decode_equals_full_forward(adapters):
    server = server_with({n: adapters[n] for n in ("r2_all", "r8_mlp", "r256_qv")})
    names = ["r2_all", None, "r256_qv", "r8_mlp"]
    x = batch_ids(rows=4, seq=9)
    full = server(input_ids=x, adapter_names=names).logits
    pre = server(input_ids=x[:, :6], adapter_names=names, use_cache=True)
    cache = pre.past_key_values
    steps = []
    for t in range(6, 9):
        step = server(input_ids=x[:, t:t + 1], adapter_names=names, past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        steps.append(step.logits[:, 0])
    assert rel_err(pre.logits, full[:, :6]) < 1e-5
    assert rel_err(torch.stack(steps, 1), full[:, 6:9]) < 1e-5
    gen = server.generate(input_ids=x[:, :4], adapter_names=names, max_new_tokens=4, do_sample=False)
    assert gen.shape == (4, 8)
    # Greedy generation equals greedy argmax over full forwards, row by row.
    seq = x[:, :4]
    for _ in range(4):
        nxt = server(input_ids=seq, adapter_names=names).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


def test_gpt2_conv1d_served(tmp_path):
    model = tiny_gpt2()
    with pytest.warns(UserWarning):
        pylora.inject(model, pylora.LoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    randomize_lora(model)
    merged = pylora.merge_and_unload(copy.deepcopy(model))
    server = pylora.MultiLoRA(tiny_gpt2())
    server.load_adapter("a", model)
    x = ids(batch=3)
    with torch.no_grad():
        want = merged(x).logits
    got = server(input_ids=x, adapter_names=["a", None, "a"]).logits
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[2], want[2]) < 1e-5
    with torch.no_grad():
        assert rel_err(got[1], tiny_gpt2()(x).logits[1]) < 1e-6


def test_bad_names_are_errors_and_next_batch_is_served(adapters, expected_logits):
    server = server_with({n: adapters[n] for n in ("r1_q", "r4_qv")})
    x = batch_ids(rows=3)
    with pytest.raises(ValueError, match=r"adapter_names\[1\]='nobody' is not loaded \(loaded: r1_q, r4_qv\)"):
        server(input_ids=x, adapter_names=["r1_q", "nobody", None])
    with pytest.raises(ValueError, match=r"adapter_names has 2 entries, the batch has 3 rows"):
        server(input_ids=x, adapter_names=["r1_q", None])
    server.unload_adapter("r4_qv")
    with pytest.raises(ValueError, match=r"adapter_names\[0\]='r4_qv' is not loaded"):
        server(input_ids=x, adapter_names=["r4_qv", None, None])
    with pytest.raises(KeyError, match="no adapter named 'r4_qv'"):
        server.unload_adapter("r4_qv")
    out = server(input_ids=x, adapter_names=["r1_q", None, "r1_q"]).logits
    assert rel_err(out[0], expected_logits["r1_q"][0]) < 1e-5
    assert rel_err(out[1], expected_logits[None][1]) < 1e-6
    with pytest.raises(ValueError, match="already loaded"):
        server.load_adapter("r1_q", adapters["r1_q"])


def test_capacity_lru_eviction_and_pinning(adapters, expected_logits):
    # 260 rows per module: in q_proj, r256_qv (256 rows) fits beside r1_q (1) but not beside r4_qv (4) too.
    server = pylora.MultiLoRA(make_base(), capacity_rows=260, max_adapters=4)
    for n in ("r1_q", "r4_qv", "r64_v", "r256_qv", "r8_mlp"):
        server.load_adapter(n, adapters[n])
    assert server.resident_adapters() == []  # host copies only, until a batch needs them
    x = batch_ids(rows=2)

    def served(names):
        out = server(input_ids=x, adapter_names=names).logits
        for row, n in enumerate(names):
            assert rel_err(out[row], expected_logits[n][row]) < 1e-5, n

    for n in ("r1_q", "r4_qv", "r64_v"):
        served([n, None])
    assert server.resident_adapters() == ["r1_q", "r4_qv", "r64_v"]
    # r256_qv needs 256 q_proj rows: the least recently used holder of q_proj rows not in this batch goes.
    served(["r256_qv", "r1_q"])
    assert server.resident_adapters() == ["r1_q", "r256_qv", "r64_v"]
    # Pinned adapters are never evicted; when nothing can make room, a clear error, and nothing breaks.
    server.pin("r256_qv")
    server.pin("r1_q")
    with pytest.raises(pylora.PoolFullError, match=r"cannot make adapter 'r4_qv' resident: module "
                                                   r"'model\.layers\.0\.self_attn\.q_proj' needs 4 rows and has 3 "
                                                   r"free of 260, and every resident adapter .* is pinned"):
        server(input_ids=x, adapter_names=["r4_qv", None])
    served(["r8_mlp", "r256_qv"])
    server.unpin("r1_q")
    served(["r4_qv", "r256_qv"])
    assert "r1_q" not in server.resident_adapters()
    served(["r1_q", None])  # swapped back in from its host copy


def test_load_and_unload_while_serving(adapters, expected_logits):
    stable = ["r1_q", "r16_all", "emb"]
    churn = ["r4_qv", "r8_mlp", "r32_o"]
    server = server_with({n: adapters[n] for n in stable}, capacity_rows=400, max_adapters=6)
    x = batch_ids(rows=4)
    errors, served = [], [0]
    stop = threading.Event()

    def churner():
        rng = random.Random(1)
        while not stop.is_set():
            n = rng.choice(churn)
            try:
                if n in server.adapters:
                    server.unload_adapter(n)
                else:
                    server.load_adapter(n, adapters[n])
            except (KeyError, ValueError) as exc:
                errors.append(f"churn: {exc}")

    def check(names, out):
        for row, name in enumerate(names):
            err = rel_err(out[row], expected_logits[name][row])
            if err > 1e-5:
                errors.append(f"row {row} ({name}): rel err {err:.2e}")

    t = threading.Thread(target=churner)
    t.start()
    rng = random.Random(2)
    try:
        for _ in range(150):
            names = [rng.choice(stable + [None]) for _ in range(3)] + [rng.choice(churn)]
            try:
                out = server(input_ids=x, adapter_names=names).logits
            except ValueError as exc:  # a churn adapter unloaded just before: a clean error
                assert "not loaded" in str(exc) or "was unloaded" in str(exc), exc
                names = names[:3] + [None]
                out = server(input_ids=x, adapter_names=names).logits
            check(names, out)
            served[0] += 1
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:5]
    assert served[0] == 150


def test_refuses_models_with_lora_layers_and_conv2d_adapters(adapters):
    with pytest.raises(ValueError, match="holds pylora LoRA layers"):
        pylora.MultiLoRA(adapters["r1_q"])
    from tests.models import ConvNet

    net = ConvNet()
    pylora.inject(net, pylora.LoraConfig(target_modules=["conv1"]))
    server = pylora.MultiLoRA(ConvNet())
    with pytest.raises(pylora.AdapterError, match="module 'conv1' has a Conv2d target"):
        server.load_adapter("c", net)
    assert server.adapters == []


def test_load_from_peft_directories(adapters, expected_logits, tmp_path):
    peft = pytest.importorskip("peft")
    # One adapter written by pylora, one by PEFT itself, both read through pylora.io.
    pylora.save_adapter(adapters["r4_qv"], tmp_path / "ours")
    targets, r, alpha, rs, rp = ADAPTERS["r8_mlp"]
    pm = peft.get_peft_model(make_base(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    copy_lora_into_peft(adapters["r8_mlp"], pm)
    pm.save_pretrained(tmp_path / "theirs")
    server = pylora.MultiLoRA(make_base())
    server.load_adapters({"r4_qv": tmp_path / "ours", "r8_mlp": tmp_path / "theirs"}, progress=False)
    assert server.adapters == ["r4_qv", "r8_mlp"]
    names = ["r8_mlp", "r4_qv", None]
    out = server(input_ids=batch_ids(rows=3), adapter_names=names).logits
    for row, n in enumerate(names):
        assert rel_err(out[row], expected_logits[n][row]) < 1e-5, n
    # A broken directory is an AdapterError and leaves the server as it was.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    with pytest.raises(pylora.AdapterError, match="adapter_config.json"):
        server.load_adapter("broken", tmp_path / "broken")
    assert server.adapters == ["r4_qv", "r8_mlp"]


def test_embedding_adapter_from_directory(adapters, expected_logits, tmp_path):
    # PEFT (and pylora) save the whole embedding beside an embedding target; it equals the base's.
    path = pylora.save_adapter(adapters["emb"], tmp_path / "emb")
    server = pylora.MultiLoRA(make_base())
    server.load_adapter("emb", path)
    out = server(input_ids=batch_ids(rows=2), adapter_names=["emb", None]).logits
    assert rel_err(out[0], expected_logits["emb"][0]) < 1e-5
    other = pylora.MultiLoRA(tiny_llama(seed=3, vocab=VOCAB, hidden=HIDDEN))  # another base: a different embedding
    with pytest.raises(ValueError, match=r"also holds embedding tensor 'model\.embed_tokens\.weight'"):
        other.load_adapter("emb", path)
    assert other.adapters == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_served_on_gpu(adapters, expected_logits, dtype):
    # The "device" param makes this a GPU test (skipped without one); see conftest.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    server = pylora.MultiLoRA(make_base().to("cuda", dtype))
    for name, model in adapters.items():
        server.load_adapter(name, model)
    names = list(ADAPTERS) + [None, "r16_all", None]
    x = batch_ids(rows=len(names)).cuda()
    out = server(input_ids=x, adapter_names=names).logits.float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for row, name in enumerate(names):
        assert rel_err(out[row], expected_logits[name][row]) < tol, (row, name)
    # Decode: one token per row.
    step = server(input_ids=x[:, :1], adapter_names=names).logits.float().cpu()
    for row, name in enumerate(names):
        assert rel_err(step[row], expected_logits[name][row, :1]) < tol, (row, name)


test_served_on_gpu = pytest.mark.cuda(test_served_on_gpu)


def test_capacity_in_bytes_sizes_each_module(adapters, expected_logits):
    budget = 40 * (HIDDEN + HIDDEN) * 4  # 40 rows of a [HIDDEN -> HIDDEN] fp32 module
    server = pylora.MultiLoRA(make_base(), capacity_bytes=budget)
    server.load_adapter("r16_all", adapters["r16_all"])
    pools = server.pool.modules
    q = pools["model.layers.0.self_attn.q_proj"]
    down = pools["model.layers.0.mlp.down_proj"]  # I = 2 * HIDDEN: fewer rows for the same bytes
    assert q.capacity == 40 and down.capacity == budget // ((2 * HIDDEN + HIDDEN) * 4)
    out = server(input_ids=batch_ids(rows=2), adapter_names=["r16_all", None]).logits
    assert rel_err(out[0], expected_logits["r16_all"][0]) < 1e-5

"""A pylora model through transformers' Trainer, as a PEFT model goes through it: a real Trainer run on a
tiny Llama (CPU) saves adapter-sized checkpoints in PEFT's format; a resume from one continues to the very
parameters of an uninterrupted run; load_best_model_at_end loads the best; a fresh process loads the
adapter back (pylora.load_adapter, and transformers' own from_pretrained through PEFT) with the trained
model's outputs, and without PEFT from_pretrained refuses the folder instead of returning random LoRA
weights; trainer.model is served by MultiLoRA and merged directly."""
import copy
import json
import logging
import os
import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import pylora
from pylora.adapters import adapter_tensors
from pylora.nn.inject import adapter_keys
from tests.helpers import PYTHON, TOL
from tests.models import llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, STEPS, SAVE_EVERY = 128, 6, 3
CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        self.ids = torch.randint(0, VOCAB, (n, 12), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class AdapterAtSave(transformers.TrainerCallback):
    """The adapter's tensors at every checkpoint, as the model held them."""

    def __init__(self):
        self.saved = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.saved[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()
                                         if k in set(adapter_keys(model))}


def injected(base_dir, init_seed=0):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(init_seed)  # the LoRA initialisation: a resumed run must not depend on it
    pylora.inject(model, pylora.LoraConfig(**CFG))
    pylora.mark_only_lora_trainable(model)
    return model


def training_args(out, **overrides):
    kwargs = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, save_strategy="steps",
                  save_steps=SAVE_EVERY, learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1,
                  logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                  dataloader_num_workers=0)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted Trainer run (6 steps, a checkpoint every 3) on a Llama saved with save_pretrained."""
    root = tmp_path_factory.mktemp("trainer")
    base_dir = root / "base"
    llama(hidden=64, vocab=VOCAB).save_pretrained(str(base_dir))
    model = injected(base_dir)
    saves = AdapterAtSave()
    trainer = transformers.Trainer(model=model, args=training_args(root / "a"), train_dataset=Rows(),
                                   callbacks=[saves])
    trainer.train()
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"root": root, "base_dir": base_dir, "trainer": trainer, "model": model, "saves": saves.saved,
            "final": final, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "logits": logits(model, IDS)}


def test_the_run_trained_the_adapter(run):
    fresh = injected(run["base_dir"])
    changed = [k for k in adapter_keys(run["model"]) if not torch.equal(run["final"][k], fresh.state_dict()[k])]
    assert len(changed) == len(adapter_keys(run["model"])) == 8  # A and B of q_proj, v_proj in 2 layers
    assert all(torch.equal(run["final"][k], fresh.state_dict()[k])
               for k in fresh.state_dict() if k not in set(adapter_keys(run["model"])))  # the base is frozen


@pytest.mark.parametrize("step", [SAVE_EVERY, STEPS])
def test_checkpoint_is_the_adapter_in_peft_format(run, step):
    ckpt = run["root"] / "a" / f"checkpoint-{step}"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "optimizer.pt",
            "scheduler.pt", "trainer_state.json"} <= files
    assert "config.json" not in files  # no model here: from_pretrained cannot take the folder for one

    # PEFT's files: its keys, only LoRA factors, the values the model had at that step.
    peft_file = load_file(ckpt / "adapter_model.safetensors")
    assert set(peft_file) == set(adapter_tensors(run["model"]))
    assert all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in peft_file)
    at_save = run["saves"][step]
    for key, t in peft_file.items():
        live = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A").replace(
            ".lora_B.weight", ".lora_B")
        assert torch.equal(t, at_save[live]), key
    # The resume copy: the same tensors under the model's own keys, nothing else.
    resume = load_file(ckpt / "model.safetensors")
    assert set(resume) == set(adapter_keys(run["model"])) == set(at_save)
    assert all(torch.equal(resume[k], at_save[k]) for k in resume)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(run["base_dir"])

    # Adapter-sized: each weight file a few percent of the model's, the whole checkpoint a fraction of it.
    model_bytes = os.path.getsize(run["base_dir"] / "model.safetensors")
    for name in ("adapter_model.safetensors", "model.safetensors"):
        assert os.path.getsize(ckpt / name) < 0.05 * model_bytes, (name, os.path.getsize(ckpt / name), model_bytes)
    total = sum(os.path.getsize(ckpt / f) for f in files)
    assert total < 0.25 * model_bytes, (total, model_bytes)


def test_resume_continues_exactly(run, tmp_path):
    """A new process's view: a fresh model (another LoRA initialisation) resumed from checkpoint-3 ends at
    the uninterrupted run's parameters bit for bit (adapter, optimizer, scheduler and RNG restored), with
    the same losses, and Trainer reports no missing keys."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(handler)
    try:
        model = injected(run["base_dir"], init_seed=123)
        trainer = transformers.Trainer(model=model, args=training_args(tmp_path / "b"), train_dataset=Rows())
        trainer.train(resume_from_checkpoint=str(run["root"] / "a" / f"checkpoint-{SAVE_EVERY}"))
    finally:
        trainer_logger.removeHandler(handler)
    assert not [m for m in messages if "missing keys" in m or "unexpected keys" in m], messages
    state = model.state_dict()
    assert state.keys() == run["final"].keys()
    for k, v in run["final"].items():
        assert torch.equal(state[k], v), k
    # The history: steps 1-3 from the checkpoint's trainer state, 4-6 computed again, all equal.
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h] == run["losses"]
    assert len(run["losses"]) == STEPS


def test_resume_state_loads_strictly_into_an_injected_model(run):
    """What Trainer's resume does, by hand: model.load_state_dict(model.safetensors) reports nothing
    missing; the base is not missing from an adapter state dict."""
    model = injected(run["base_dir"], init_seed=7)
    result = model.load_state_dict(load_file(run["root"] / "a" / f"checkpoint-{STEPS}" / "model.safetensors"))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(model.state_dict()[k], run["final"][k]) for k in run["final"])


def test_load_best_model_at_end(run, tmp_path):
    model = injected(run["base_dir"])
    trainer = transformers.Trainer(
        model=model, train_dataset=Rows(), eval_dataset=Rows(8, seed=1),
        args=training_args(tmp_path / "best", eval_strategy="steps", eval_steps=2, save_steps=2,
                           load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                           learning_rate=5e-2))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.basename(best) in {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    saved = load_file(os.path.join(best, "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


FRESH_PROCESS = """
import sys, torch
block_peft = sys.argv[4] == "no-peft"
if block_peft:
    sys.modules["peft"] = None  # as if PEFT were not installed
import transformers, pylora
base_dir, ckpt, out = sys.argv[1:4]
ids = torch.load(out + ".ids")
result = {}
if not block_peft:
    model = pylora.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(base_dir), ckpt).eval()
    with torch.no_grad():
        result["pylora"] = model(input_ids=ids).logits
    # transformers' own way: from_pretrained of the adapter folder, through its PEFT integration.
    plain = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    result["from_pretrained_type"] = type(plain).__name__ + (" with PEFT" if hasattr(plain, "peft_config") else "")
    with torch.no_grad():
        result["from_pretrained"] = plain(input_ids=ids).logits
else:
    try:
        transformers.AutoModelForCausalLM.from_pretrained(ckpt)
        result["from_pretrained"] = "loaded"
    except Exception as exc:
        result["from_pretrained"] = f"{type(exc).__name__}: {exc}"
torch.save(result, out)
"""


@pytest.mark.parametrize("peft_installed", [True, False], ids=["peft", "no-peft"])
def test_fresh_process_loads_the_trained_adapter(run, tmp_path, python_env, peft_installed):
    if peft_installed:
        pytest.importorskip("peft")
    out = tmp_path / "result.pt"
    torch.save(IDS, str(out) + ".ids")
    ckpt = run["root"] / "a" / f"checkpoint-{STEPS}"
    proc = subprocess.run([PYTHON, "-c", textwrap.dedent(FRESH_PROCESS), str(run["base_dir"]), str(ckpt), str(out),
                           "peft" if peft_installed else "no-peft"], env=dict(python_env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out)
    if peft_installed:
        torch.testing.assert_close(result["pylora"], run["logits"], rtol=0, atol=0)  # the same kernels, bit for bit
        assert result["from_pretrained_type"] == "LlamaForCausalLM with PEFT"
        rtol, atol = TOL[torch.float32]
        torch.testing.assert_close(result["from_pretrained"], run["logits"], rtol=10 * rtol, atol=10 * atol)
    else:  # never a model with random LoRA weights: the folder holds no model, and without PEFT no adapter
        assert not isinstance(result["from_pretrained"], torch.Tensor) and result["from_pretrained"] != "loaded"
        assert "Error" in result["from_pretrained"], result["from_pretrained"]


def test_trainer_model_serves_and_merges(run, tmp_path):
    model = run["model"]
    base = transformers.AutoModelForCausalLM.from_pretrained(run["base_dir"]).eval()
    with torch.no_grad():
        base_logits = base(input_ids=IDS).logits

    server = pylora.MultiLoRA(copy.deepcopy(base))
    server.load_adapter("trained", run["trainer"].model)
    with torch.no_grad():
        served = server(input_ids=IDS, adapter_names=["trained", None, "trained"]).logits
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(served[[0, 2]], run["logits"][[0, 2]], rtol=rtol, atol=atol)
    torch.testing.assert_close(served[1], base_logits[1], rtol=rtol, atol=atol)

    merged = pylora.merge_and_unload(copy.deepcopy(run["trainer"].model)).eval()
    torch.testing.assert_close(logits(merged, IDS), run["logits"], rtol=rtol, atol=atol)
    # A plain model again: save_pretrained is transformers' own and writes the whole merged model.
    assert "save_pretrained" not in vars(merged) and pylora.get_config(merged) is None
    merged.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(back, IDS), logits(merged, IDS), rtol=0, atol=0)
    assert model is run["trainer"].model and pylora.get_config(model) is not None  # the original is untouched


def test_trainer_save_model_writes_peft_files_only(run, tmp_path):
    """trainer.save_model(dir) outside a checkpoint: exactly what PeftModel.save_pretrained writes (plus
    Trainer's training_args.bin), loadable by PEFT."""
    run["trainer"].save_model(str(tmp_path / "final"))
    assert sorted(os.listdir(tmp_path / "final")) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "training_args.bin"]
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(run["base_dir"])
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "final")).eval()
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(logits(theirs, IDS), run["logits"], rtol=10 * rtol, atol=10 * atol)

"""Every code block of the README runs: the Python blocks in order as one script, the shell
commands as written (make targets as a dry run: they are what CI itself runs)."""
import os
import re
import shutil
import subprocess

import pytest

from tests.helpers import PYTHON

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def blocks(lang):
    text = open(README).read()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_readme_has_code():
    assert len(blocks("python")) >= 4 and len(blocks("bash")) >= 2


@pytest.mark.slow
def test_readme_python_and_shell_blocks(tmp_path, python_env):
    env = dict(python_env, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env["PATH"] = os.path.dirname(PYTHON) + os.pathsep + env.get("PATH", "")
    script = tmp_path / "readme.py"
    script.write_text("import torch\ntorch.manual_seed(0)\n" + "\n".join(blocks("python")))
    out = subprocess.run([PYTHON, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    # The shell blocks refer to a base model directory and to the example scripts.
    make_base = ("import torch\nfrom transformers import LlamaConfig, LlamaForCausalLM\ntorch.manual_seed(0)\n"
                 "LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, "
                 "num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).save_pretrained('path/to/model')\n")
    subprocess.run([PYTHON, "-c", make_base], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    shutil.copytree(os.path.join(ROOT, "examples"), tmp_path / "examples")
    for block in blocks("bash"):
        for line in block.splitlines():
            cmd = line.split("#", 1)[0].strip()
            if not cmd:
                continue
            if cmd.startswith("make "):
                # A dry run: the targets exist and expand; running them is CI's own job.
                args = ["make", "-n", "-C", ROOT] + cmd.split()[1:]
                res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
            else:
                if cmd.startswith("torchrun "):
                    cmd += " --steps 2"
                res = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                     timeout=600)
            assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"

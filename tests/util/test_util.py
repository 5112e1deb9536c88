"""The shared helpers: progress bars, bounded pattern matching, bounded JSON."""
import os
import re
import sys
import time

import pytest

from pylora.util import patterns
from pylora.util.files import FileProblem, read_json
from pylora.util.progress import progress_enabled


class _Terminal:
    def isatty(self):
        return True

    def write(self, s):
        return len(s)

    def flush(self):
        pass

def test_progress_follows_the_terminal_and_tqdm_disable(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert progress_enabled() is True
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_enabled() is False
    assert progress_enabled(True) is True
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))
    assert progress_enabled() is False


# ----------------------------------------------------------------------------------------------
# Bounded pattern matching
# ----------------------------------------------------------------------------------------------

NAMES = ["model.layers.0.self_attn.q_proj", "model.vision_tower.layers.1.q_proj", "lm_head", "h.10.mlp.c_fc"]


@pytest.mark.parametrize("pattern", [r".*\.(q_proj|v_proj)", r"^(?!.*vision_tower).*q_proj$", r"(.*)\.c_(fc|proj)",
                                     r"model\.layers\.\d+\..*", r"(?P<x>\w+)\.(?P=x)?.*"])
def test_patterns_mean_what_python_re_means(pattern):
    for name in NAMES:
        assert patterns.fullmatch("target_modules", pattern, name) == (re.fullmatch(pattern, name) is not None)
        assert bool(patterns.match("f", pattern, name)) == bool(re.match(pattern, name))


def test_a_backtracking_pattern_is_refused_in_bounded_time():
    hostile = r"(.*?)+\.(.*?)+\.(.*?)+X"  # Python's re: minutes on this name
    start = time.monotonic()
    with pytest.raises(patterns.PatternError, match=r"target_modules='\(\.\*\?\)\+.*': matching it against the "
                                                     r"module name 'model\.layers\.0\.self_attn\.q_proj' took more "
                                                     r"than 0\.25 s") as info:
        patterns.fullmatch("target_modules", hostile, NAMES[0])
    assert time.monotonic() - start < 5 * patterns.MATCH_TIMEOUT + 1
    assert (info.value.field, info.value.pattern) == ("target_modules", hostile)
    assert isinstance(info.value, ValueError)


def test_an_invalid_pattern_names_the_field():
    with pytest.raises(patterns.PatternError, match=r"layers_pattern='layers\[' is not a valid regular expression"):
        patterns.check("layers_pattern", "layers[")
    with pytest.raises(patterns.PatternError, match=r"layers_pattern=3 must be a string"):
        patterns.check("layers_pattern", 3)


# ----------------------------------------------------------------------------------------------
# Bounded JSON
# ----------------------------------------------------------------------------------------------

def test_read_json_refuses_with_the_file_named(tmp_path):
    p = tmp_path / "c.json"
    for text, message in [('{"a": 1, "a": 2}', r"field 'a' appears more than once"),
                          ('{"a": ', r"malformed JSON at line 1 column 7"), ("[" * 100000 + "]" * 100000,
                                                                           r"nested too deeply"),
                          ('{"a": "' + "x" * 200 + '"}', r"bytes, more than the 100 bytes allowed for a test file")]:
        p.write_text(text)
        with pytest.raises(FileProblem, match=message):
            read_json(str(p), 100 if "x" * 200 in text else 10**7, "a test file")
    p.write_text('{"r": 4}')
    assert read_json(str(p), 100, "a test file") == {"r": 4}

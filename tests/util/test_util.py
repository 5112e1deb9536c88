"""The shared helpers: progress bars, bounded pattern matching."""
import os
import sys

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

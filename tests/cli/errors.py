"""What every `pylora merge` failure looks like on stderr: the first line "pylora merge: error: ..."; when
the error has several problems, that line says how many ("N problems:") and each follows on its own
line ("  - ..."), all of them; never a traceback."""
import re


def merge_error_lines(err: str) -> list[str]:
    """The lines of a `pylora merge` error (stderr), checked for that shape."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines and lines[0].startswith("pylora merge: error: "), err
    if len(lines) > 1:
        count = re.search(r"(\d+) problems:$", lines[0])
        assert count and int(count.group(1)) == len(lines) - 1, err  # every problem, one line each
        assert all(line.startswith("  - ") and len(line) > 4 for line in lines[1:]), err
    return lines


def assert_merge_error(proc, *fragments, problems=None, code=1):
    """A failed `pylora merge` subprocess: status `code`, nothing on stdout, stderr as merge_error_lines
    wants it with `problems` problem lines (None: any number), each fragment somewhere in it. Returns the
    lines."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "", proc.stdout
    lines = merge_error_lines(proc.stderr)
    if problems is not None:
        assert len(lines) == 1 + (problems if problems > 1 else 0), proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    return lines

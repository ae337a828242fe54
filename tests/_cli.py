"""What the command line's user errors look like to a test: exit 2 and one line on stderr."""


def one_line_error(capsys, rc) -> str:
    """The one ``error: ...`` line a CLI call printed, after checking it exited 2."""
    out = capsys.readouterr()
    assert rc == 2, out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    return lines[0]

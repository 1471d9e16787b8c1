"""Running the cai-fast command in process and reading its one-line errors."""

from __future__ import annotations

# the shortest SL-CAI run, for the commands' error tests
SL_CAI = ["--rounds", "1", "--batch-size", "2", "--answer-tokens", "4", "--critique-tokens", "4",
          "--revision-tokens", "4", "--limit", "2", "--quiet"]


def one_line_error(capsys, *expected: str, after_loading: bool = False) -> str:
    """The command's stderr, checked to be one `cai-fast: error:` line holding every `expected`
    (after_loading: the last line, after transformers' loading progress bars)."""
    err = capsys.readouterr().err.strip()
    err = err.splitlines()[-1] if after_loading else err
    assert len(err.splitlines()) == 1 and err.startswith("cai-fast: error: "), err
    for text in expected:
        assert text in err, err
    return err

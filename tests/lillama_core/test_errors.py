import pytest

from lillama_core.errors import first_line


@pytest.mark.parametrize("exc, line", [
    (OSError("disk full\nerrno 28"), "disk full"),
    (ValueError("\n  \n  second line is the first with text  \nthird"), "second line is the first with text"),
    (KeyError(), "KeyError"),
    (RuntimeError(""), "RuntimeError"),
    (RuntimeError("   \n\n"), "RuntimeError"),
])
def test_first_line_is_the_first_line_with_text_or_the_type_name(exc, line):
    assert first_line(exc) == line

"""Optional dependencies: one helper, one install hint, printed literally."""

import pytest

from leukotree.errors import MissingDependencyError
from leukotree.optional import available, require
from leukotree.report.console import print_error, stderr_console


def test_require_names_the_extra_to_install():
    assert require("json", extra="x", purpose="JSON").dumps([1]) == "[1]"
    with pytest.raises(MissingDependencyError) as err:
        require("no_such_package.sub", extra="explain", purpose="Heat maps")
    assert str(err.value) == ("Heat maps needs the 'no_such_package' package: "
                              "pip install 'leukotree[explain]'.")
    assert available("json") and not available("json", "no_such_package")


def test_error_messages_print_brackets_and_markup_literally(capsys):
    print_error(stderr_console(), "pip install 'leukotree[explain]' for [bold]x.png[/]")
    err = capsys.readouterr().err
    assert "pip install 'leukotree[explain]' for [bold]x.png[/]" in err

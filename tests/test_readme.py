"""The README's Python examples are executed (doctest), so they stay true."""

import doctest
import os

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_examples():
    pytest.importorskip("torch")
    failures, tried = doctest.testfile(README, module_relative=False, optionflags=doctest.ELLIPSIS)
    assert tried > 5
    assert failures == 0

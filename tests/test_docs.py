"""Every public function documents its arguments and carries a runnable example.

The examples themselves run as doctests (``--doctest-modules`` over ``jaxce``); this checks
that each public function has them, so that a docstring built by an expression (whose
``__doc__`` is None, and whose examples never run) cannot slip back in.
"""

import doctest
import inspect

import pytest

import jaxce

PUBLIC_FUNCTIONS = sorted(
    name for name in dir(jaxce)
    if not name.startswith("_") and inspect.isfunction(getattr(jaxce, name))
)


def test_the_public_face_is_found():
    assert {"softmax_cross_entropy", "linear_softmax_cross_entropy", "entropy"} <= set(
        PUBLIC_FUNCTIONS
    )


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_function_has_args_and_a_runnable_example(name):
    fn = getattr(jaxce, name)
    doc = inspect.getdoc(fn)
    assert doc, f"jaxce.{name} has no docstring"
    assert "\nArgs:\n" in doc, f"jaxce.{name}'s docstring has no Args section"
    parameters = [p for p in inspect.signature(fn).parameters if p not in ("args", "kwargs")]
    missing = [p for p in parameters if p not in doc]
    assert not missing, f"jaxce.{name}'s docstring does not mention {missing}"
    (test,) = doctest.DocTestFinder(recurse=False).find(fn, name)
    assert test.examples, f"jaxce.{name}'s docstring has no example"


def test_all_lists_the_public_face():
    """__all__ is every public function and class, and the losses namespace; the demo's
    modules (jaxce.train, jaxce.datasets) are attributes only once something imports them."""
    public = {
        n for n in dir(jaxce)
        if not n.startswith("_") and not inspect.ismodule(getattr(jaxce, n))
    }
    assert set(jaxce.__all__) == public | {"losses"}, set(jaxce.__all__) ^ (public | {"losses"})

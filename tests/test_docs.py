"""Every public function documents its arguments and carries a runnable example.

The examples themselves run as doctests (``--doctest-modules`` over ``jaxce``); this checks
that each public function has them, so that a docstring built by an expression (whose
``__doc__`` is None, and whose examples never run) cannot slip back in.
"""

import ast
import doctest
import importlib
import inspect
import pathlib
import re

import pytest

import jaxce

PUBLIC_FUNCTIONS = sorted(
    name
    for name in dir(jaxce)
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
        n for n in dir(jaxce) if not n.startswith("_") and not inspect.ismodule(getattr(jaxce, n))
    }
    assert set(jaxce.__all__) == public | {"losses"}, set(jaxce.__all__) ^ (public | {"losses"})
    # No other module (the standard library's the package imports) shows as a public name.
    modules = {n for n in dir(jaxce) if not n.startswith("_")} - public
    assert modules <= {"losses", "train", "datasets"}, modules


def test_static_imports_name_what_the_lazy_attributes_load():
    """``jaxce/__init__.py`` imports its public names only under ``typing.TYPE_CHECKING`` (for
    type checkers and the docs) and loads them on first access: both name the same objects."""
    tree = ast.parse(pathlib.Path(jaxce.__file__).read_text())
    (block,) = [node for node in tree.body if isinstance(node, ast.If)]
    assert ast.unparse(block.test) == "typing.TYPE_CHECKING"
    static = {}
    for node in block.body:
        (alias,) = node.names
        assert alias.asname == alias.name, alias.name  # re-exported, for type checkers
        if node.module is None:  # from . import losses
            static[alias.name] = importlib.import_module(f"jaxce.{alias.name}")
        else:
            static[alias.name] = getattr(
                importlib.import_module(f"jaxce.{node.module}"), alias.name
            )
    assert sorted(static) == sorted(jaxce.__all__)
    for name, obj in static.items():
        assert getattr(jaxce, name) is obj, name


def test_unknown_attribute_raises_naming_it():
    with pytest.raises(AttributeError, match="module 'jaxce' has no attribute 'sofmax'"):
        jaxce.sofmax  # noqa: B018
    with pytest.raises(ImportError, match="sofmax"):
        from jaxce import sofmax  # noqa: F401


def _arguments(fn):
    """The entries of ``fn``'s Args section, by argument name."""
    args = inspect.getdoc(fn).split("\nArgs:\n", 1)[1].split("\n\n", 1)[0].split("\nReturns:")[0]
    return dict(re.findall(r"^  (\w+): (.*(?:\n    .*)*)", args, re.MULTILINE))


def test_softmax_cross_entropies_describe_their_shared_options_alike():
    soft = _arguments(jaxce.softmax_cross_entropy)
    integer = _arguments(jaxce.softmax_cross_entropy_with_integer_labels)
    parameters = set(inspect.signature(jaxce.softmax_cross_entropy).parameters)
    shared = parameters - {"logits", "labels", "axis"}
    assert shared <= soft.keys() & integer.keys(), shared - (soft.keys() & integer.keys())
    for name in shared:
        assert soft[name] == integer[name], name
    sparse = _arguments(jaxce.softmax_cross_entropy_with_sparse_labels)
    for name in shared:
        assert sparse[name] == soft[name], name

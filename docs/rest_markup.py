"""Griffe extension: the reST markup of jaxce's docstrings, as the Markdown the site renders.

The docstrings are Google style with reST inside (what ``help()`` and Sphinx read): math as
``:math:`...``` and ``.. math::`` blocks, cross-references as ``:func:`name```. Before
mkdocstrings parses them, this rewrites

- ``:math:`x``` to ``\\(x\\)`` and a ``.. math::`` block to ``$$ ... $$``, which
  ``pymdownx.arithmatex`` marks for KaTeX (``docs/javascripts/katex.js``);
- ``:func:`name``` (and ``:class:``, ``:mod:``, ``:data:``) to a cross-reference: a plain name
  is looked up in the docstring's module, as Python would; a ``jaxce`` path is taken as given.
  A target that the site does not document fails ``mkdocs build --strict``. Names from other
  packages (``jax.jit``) become code: the site has no inventory of their documentation.

The two softmax cross-entropies share their options' text: their source docstrings hold an
``{options}`` line that ``jaxce._options.expand_option_doc`` fills in, at import for ``help()``
and here for the site (griffe reads the source).

Any other role is reported, and so is a section title (``Args:``, ``Returns:``, ...) that is
indented or has no blank line above, which the Google parser takes for text: ``--strict`` then
fails instead of showing them raw.
"""

import inspect
import re

import griffe

from jaxce._options import expand_option_doc

logger = griffe.get_logger(__name__)

ROLE = re.compile(r":(?P<role>[a-z]+):`(?P<text>[^`]+)`")
MATH_DIRECTIVE = re.compile(r"^(?P<indent> *)\.\. math::(?P<rest>.*)$")
CROSS_REFERENCE_ROLES = {"func", "class", "mod", "data"}
SECTION_TITLE = re.compile(
    r"(?P<indent>\s*)(Args|Returns|Yields|Raises|Examples|Note|References):\s*"
)


def _math_blocks(text: str) -> str:
    """``.. math::`` and its indented body become a ``$$`` block at the directive's indent."""
    lines = text.split("\n")
    out = []
    i = 0
    while i < len(lines):
        match = MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["rest"].strip()] if match["rest"].strip() else []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out += ["", f"{indent}$$", *(f"{indent}{line}" for line in body), f"{indent}$$", ""]
    return "\n".join(out)


def _check_section_titles(obj: griffe.Object, where: str) -> None:
    """Warns (once) of a section title in ``obj``'s docstring that the parser will not see."""
    lines = obj.docstring.value.split("\n")
    for above, line in zip(["", *lines], lines):
        title = SECTION_TITLE.fullmatch(line)
        if title and (title["indent"] or above.strip()):
            logger.warning(
                f"{where}: {obj.path}'s section title {line.strip()} is indented or has no "
                "blank line above: the Google parser takes it for text"
            )
            return


class RestMarkup(griffe.Extension):
    """Rewrites every docstring's reST math and roles once the package is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is None:
            return
        obj.docstring.value = inspect.cleandoc(expand_option_doc(obj.docstring.value))
        where = f"{obj.relative_filepath}:{obj.docstring.lineno}"
        _check_section_titles(obj, where)
        module = obj if obj.is_module else obj.module
        package = module.path.split(".")[0]

        def role(match: re.Match) -> str:
            name, text = match["role"], match["text"]
            if name == "math":
                return rf"\({text}\)"
            if name not in CROSS_REFERENCE_ROLES:
                logger.warning(f"{where}: role :{name}: is not rendered by docs/rest_markup.py")
                return match[0]
            path = text.removeprefix("~")
            shown = path.rsplit(".", 1)[-1] if text.startswith("~") else path
            if "." not in path:
                return f"[`{shown}`][{module.path}.{path}]"
            if path.split(".")[0] == package:
                return f"[`{shown}`][{path}]"
            return f"`{shown}`"

        obj.docstring.value = ROLE.sub(role, _math_blocks(obj.docstring.value))

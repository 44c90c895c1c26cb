"""Document -> one self-contained HTML page, from a Jinja2 template with autoescape on.

The template (``templates/report.html.j2``) and the stylesheet (``templates/report.css``) are
package data, read with :mod:`importlib.resources` so they load from a source tree and from an
installed wheel alike.  The CSS is inlined and plots are embedded as base64 PNG data URIs: the page
has no scripts and no external resources, so it opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import functools
import html
from importlib.resources import files
from typing import NoReturn

import jinja2
from markupsafe import Markup

from neftune.report.document import Document
from neftune.report.words import BETTER, LONGER, NOISE, SHORTER, WITHHELD, WORSE

__all__ = ["render_html"]

TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"

#: CSS class suffix of each verdict chip (``v-better`` ...); an unknown verdict looks like noise.
VERDICT_CSS = {
    BETTER: "better",
    WORSE: "worse",
    NOISE: "noise",
    LONGER: "longer",
    SHORTER: "shorter",
    WITHHELD: "withheld",
}


def _resource(name: str) -> str:
    """The text of ``templates/<name>`` inside this package."""
    return (files(__package__) / "templates" / name).read_text(encoding="utf-8")


def _escaped(value: object) -> object:
    """Escape a printed value with :func:`html.escape` (quotes included, ``'`` as ``&#x27;``).

    Autoescape stays on as well; this only fixes which entities the page uses. Markup the template
    built itself (macro output) passes unchanged.
    """
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value), quote=True))


def _unknown_block(block: object) -> NoReturn:
    raise TypeError(f"unknown block {type(block).__name__}")


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_resource),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        finalize=_escaped,
    )
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    env.filters["thousands"] = lambda n: f"{n:,}"
    env.globals.update(verdict_css=VERDICT_CSS, unknown_block=_unknown_block)
    return env


def render_html(doc: Document) -> str:
    """Render ``doc`` as one self-contained HTML page (inline CSS, embedded images, no scripts)."""
    css = Markup(_resource(STYLESHEET))  # package data, not user input: inlined verbatim
    return _environment().get_template(TEMPLATE).render(doc=doc, css=css)

"""The sandboxed Jinja environment a model's `chat_template` runs in, built the way transformers builds it.

Chat templates come from model folders, i.e. untrusted code, so they run in jinja2's
`ImmutableSandboxedEnvironment` (jinja2 >= 3.1.6: older versions have known sandbox escapes), with
transformers' settings and helpers: `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension,
`raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` that does not HTML-escape (ensure_ascii off),
a `dict` and a `namespace` that cannot reach Python internals, and `{% generation %}` blocks (a training
marker; rendering keeps their body). This module imports jinja2, so import it only when a model has a
template: KoGPT2 and plain-text chat work without jinja2.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

MIN_JINJA = (3, 1, 6)



def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; keep the body."""

    tags = {"generation"}  # noqa: RUF012 - jinja2 reads this class attribute

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot store or reach internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` without handing the builtin type to the template."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """The shared environment (compiled templates are thread-safe to render)."""
    if _version(jinja2.__version__) < MIN_JINJA:
        raise ImportError(
            f"chat templates need jinja2>={'.'.join(map(str, MIN_JINJA))} (older versions have sandbox escapes); "
            f"found {jinja2.__version__}"
        )
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template; raises jinja2.TemplateSyntaxError for a broken one."""
    return environment().from_string(source)


def literal_text(source: str) -> str:
    """The template's own text and string constants, NUL-joined: where its control tokens are written."""
    ast = environment().parse(source)
    parts = {node.data for node in ast.find_all(nodes.TemplateData)}
    parts |= {node.value for node in ast.find_all(nodes.Const) if isinstance(node.value, str)}
    return "\0".join(sorted(parts))

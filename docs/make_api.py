"""Write docs/api.md, the API reference, from the docstrings of sedppl's public modules.

    python docs/make_api.py          # rewrite docs/api.md
    python docs/make_api.py --check  # exit 1 if docs/api.md is not current (tests/test_docs.py)

Public: a module-level function or class defined in the module whose name does not start
with an underscore (and, for classes, their public methods and properties).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import sedppl

OUT = Path(__file__).with_name("api.md")
SKIP = {"sedppl.cli"}  # the command line has its own --help


def modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(sedppl.__path__, "sedppl.")]
    return sorted(n for n in names if n not in SKIP and not n.split(".")[-1].startswith("_"))


def members(mod) -> list[tuple[str, object]]:
    out = []
    for name, obj in vars(mod).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) == mod.__name__:
            out.append((name, obj))
    return sorted(out, key=lambda kv: _line(kv[1]))


def _line(obj) -> int:
    try:
        return inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return 0


def signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def block(doc: str | None) -> list[str]:
    if not doc:
        return ["*(no docstring)*", ""]
    return ["```text", inspect.cleandoc(doc), "```", ""]


def methods(cls) -> list[tuple[str, object]]:
    out = []
    for name, obj in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if inspect.isfunction(obj) or isinstance(obj, (property, classmethod, staticmethod)):
            out.append((name, obj))
    return out


def render() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings by `python docs/make_api.py` (a test checks it is current).",
             "Units and conventions: [conventions.md](conventions.md).", ""]
    for name in modules():
        mod = importlib.import_module(name)
        lines += [f"## `{name}`", ""] + block(mod.__doc__)
        for mname, obj in members(mod):
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [f"### {kind} `{name}.{mname}{signature(obj)}`", ""] + block(obj.__doc__)
            if inspect.isclass(obj):
                for meth, fn in methods(obj):
                    f = fn.fget if isinstance(fn, property) else getattr(fn, "__func__", fn)
                    sig = "" if isinstance(fn, property) else signature(f)
                    lines += [f"#### `{mname}.{meth}{sig}`" + (" (property)" if isinstance(fn, property) else ""),
                              ""] + block(f.__doc__)
    return "\n".join(lines).rstrip() + "\n"


def undocumented() -> list[str]:
    """Public functions, classes and methods without a docstring."""
    missing = []
    for name in modules():
        mod = importlib.import_module(name)
        if not mod.__doc__:
            missing.append(name)
        for mname, obj in members(mod):
            if not obj.__doc__:
                missing.append(f"{name}.{mname}")
            if inspect.isclass(obj):
                for meth, fn in methods(obj):
                    f = fn.fget if isinstance(fn, property) else getattr(fn, "__func__", fn)
                    if not f.__doc__ and meth not in ("forward", "__call__"):
                        missing.append(f"{name}.{mname}.{meth}")
    return missing


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")

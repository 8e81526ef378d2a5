"""
The harness checks itself: at the final evaluation, is every name of its modules, and of the classes
they define, bound in this process as it was when train.py imported the harness? A function counts
with its code and defaults, which can be replaced in place (`f.__code__ = ...`) without rebinding.
"""

import sys
import types

_PRISTINE = None  # {qualified name: identity}, taken once the harness is imported (snapshot)


def harness_modules() -> list:
    """The harness's modules in this process: prepare and the harness package's."""
    return [module for name, module in sorted(sys.modules.items())
            if module is not None and (name == "prepare" or name.startswith("harness."))]


def _identity(value) -> tuple:
    if isinstance(value, types.FunctionType):
        return (value, value.__code__, value.__defaults__, value.__kwdefaults__)
    return (value,)


def bindings(modules) -> dict:
    """{qualified name: identity} over `modules` and the classes each defines."""
    found = {}
    for module in modules:
        for name, value in vars(module).items():
            found[f"{module.__name__}.{name}"] = _identity(value)
            if isinstance(value, type) and value.__module__ == module.__name__:
                for attr, member in vars(value).items():
                    found[f"{module.__name__}.{name}.{attr}"] = _identity(member)
    return found


def snapshot():
    """Remember the harness as imported (prepare.py calls it last, before train.py's own code)."""
    global _PRISTINE
    modules = harness_modules()
    _PRISTINE = {"modules": modules, "bindings": bindings(modules)}


def harness_check(instance=None) -> dict:
    """{"ok", "changed"}: the names train.py rebound, added or whose code it replaced in the
    harness's modules and their classes since the snapshot (and methods shadowed on `instance`)."""
    if _PRISTINE is None:
        snapshot()
    then, now = _PRISTINE["bindings"], bindings(_PRISTINE["modules"])
    changed = [name for name, bound in then.items()
               if name not in now or any(a is not b for a, b in zip(bound, now[name]))]
    changed += [name for name in now if name not in then]
    changed = [name for name in changed if name != f"{__name__}._PRISTINE"]
    if instance is not None:
        changed += [f"run.{name}" for name in vars(instance) if name in vars(type(instance))]
    return {"ok": not changed, "changed": sorted(changed)[:20]}

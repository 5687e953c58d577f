"""A fresh Python process that runs ``elm_jax.main.cli`` on request and counts JAX compilations.

``python tests/fresh_cli.py`` (started by ``FreshCLI`` in ``test_bad_inputs``) installs JAX's
compile listeners before it imports ``elm_jax``, then reads one JSON request per line on stdin:

    {"argv": [...], "attrs": [[module, name, expression], ...], "stop_after_compile": false}

and runs ``main.cli(["elm_jax.main", *argv])`` with ``sys.stdout`` / ``sys.stderr`` captured,
``attrs`` set for the call (each ``expression`` evaluated in its module's namespace) and restored
after it. It answers one JSON line per request on its original stdout (everything else written to
file descriptor 1 goes to stderr):

    {"rc", "out", "err", "compiles", "before", "cases", "stopped"}

``compiles``: compilations during the call; ``before``: in this process before the call;
``cases``: calls served before this one. With ``stop_after_compile`` the first compilation raises
an exception that ends the call at once (``stopped``: true): the positive control.

A compilation is an ``/jax/core/compile/backend_compile_duration`` event (recorded on every miss of
JAX's in-memory executable cache, including loads from the persistent cache) or a
``/jax/compilation_cache/compile_requests_use_cache`` event (the persistent cache consulted). An
in-memory cache hit records neither, which is why the count is only evidence in a process where
``before`` is 0: then nothing has been compiled yet, and any compile request must miss.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # before elm_jax: the listeners see everything from here on

_EVENTS = ("/jax/core/compile/backend_compile_duration",)
_COUNT = [0]
_STOP = [False]


class StopAfterCompile(BaseException):
    """Raised by the listener at the first compilation of a ``stop_after_compile`` call."""


def _seen(event: str) -> None:
    _COUNT[0] += 1
    if _STOP[0]:
        _STOP[0] = False
        raise StopAfterCompile(event)


def _on_duration(event: str, duration: float, **kw) -> None:
    if event in _EVENTS:
        _seen(event)


def _on_event(event: str, **kw) -> None:
    if event.startswith("/jax/compilation_cache/compile_requests"):
        _seen(event)


def main() -> None:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray writes to fd 1 must not corrupt the answers
    sys.stdout = sys.stderr
    from elm_jax import main as main_lib

    for cases, line in enumerate(sys.stdin):
        req = json.loads(line)
        saved = []
        for mod_name, name, expr in req.get("attrs", ()):
            mod = importlib.import_module(mod_name)
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, eval(expr, vars(mod)))  # test inputs, written by the tests
        before, stopped = _COUNT[0], False
        out, err = io.StringIO(), io.StringIO()
        _STOP[0] = bool(req.get("stop_after_compile"))
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main_lib.cli(["elm_jax.main", *req["argv"]])
        except StopAfterCompile:
            rc, stopped = None, True
        except BaseException:  # noqa: BLE001  (reported to the test as a traceback)
            rc = None
            err.write(traceback.format_exc())
        finally:
            _STOP[0] = False
            for mod, name, value in reversed(saved):
                setattr(mod, name, value)
        proto.write(json.dumps({"rc": rc, "out": out.getvalue(), "err": err.getvalue(),
                                "compiles": _COUNT[0] - before, "before": before, "cases": cases,
                                "stopped": stopped}) + "\n")
        proto.flush()


if __name__ == "__main__":
    main()

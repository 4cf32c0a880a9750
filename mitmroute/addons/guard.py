"""Fail closed: no exception in a mitmroute hook lets a flow go on to its original host.

mitmproxy only logs an exception raised in a hook, skips the rest of that script's addons and
lets the flow continue: unrouted, unauthenticated, unlogged. `@fail_closed` on an addon class
wraps each of its mitmproxy hooks so that an exception is logged and the flow answered with an
error in its client's API shape (before the response is sent) or killed (when its headers are
already on their way). An unexpected exception in `configure` becomes an OptionsError.

The wrapper calls the hook through its `__wrapped__` attribute, so a test can swap in a
failing hook (`Router.request.__wrapped__ = boom`) and watch the guard answer.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

# imported for their side effect: they register the names of every hook mitmproxy has
import mitmproxy.proxy.layers
import mitmproxy.proxy.server_hooks  # noqa: F401
from mitmproxy import exceptions, flow, hooks, http

from mitmroute import errors
from mitmroute.addons import flows

log = logging.getLogger("mitmroute")

BEFORE_RESPONSE = frozenset({"requestheaders", "request", "response"})
"""Hooks after which the proxy may still answer the flow itself."""
UNGUARDED = frozenset({"load"})


def fail_closed[T: type](cls: T) -> T:
    """Class decorator: guard every mitmproxy hook `cls` defines."""
    assert "request" in hooks.all_hooks, "mitmproxy's hooks are not registered yet"
    for name, fn in list(vars(cls).items()):
        if name in hooks.all_hooks and name not in UNGUARDED and inspect.isfunction(fn):
            setattr(cls, name, _guard(name, fn))
    return cls


def _guard(name: str, fn: Any) -> Any:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def guarded_async(self: Any, *args: Any) -> Any:
            try:
                return await guarded_async.__wrapped__(self, *args)  # type: ignore[attr-defined]
            except Exception as e:
                return _failed(self, name, args, e)

        guarded_async.mitmroute_guarded = True  # type: ignore[attr-defined]
        return guarded_async

    @functools.wraps(fn)
    def guarded(self: Any, *args: Any) -> Any:
        try:
            return guarded.__wrapped__(self, *args)  # type: ignore[attr-defined]
        except Exception as e:
            return _failed(self, name, args, e)

    guarded.mitmroute_guarded = True  # type: ignore[attr-defined]
    return guarded


def _failed(addon: Any, hook: str, args: tuple[Any, ...], error: Exception) -> None:
    addon_name = type(addon).__name__
    if hook == "configure":
        if isinstance(error, exceptions.OptionsError):
            raise error
        raise exceptions.OptionsError(f"mitmroute: {addon_name}: {error}") from error
    log.error("mitmroute: %s.%s failed: %r", addon_name, hook, error, exc_info=error)
    target = args[0] if args else None
    if hook == "server_connect" and target is not None:
        target.server.error = f"mitmroute: {addon_name}.server_connect failed"  # no dial
        return
    if not isinstance(target, flow.Flow) or not target.live:
        return
    if isinstance(target, http.HTTPFlow) and hook in BEFORE_RESPONSE:
        if hook != "response" and target.response is not None:
            return  # already answered by the proxy: nothing can go out unrouted
        if hook == "response" and target.response is not None and target.response.stream:
            target.kill()  # its head and part of its body are already with the client
            return
        err = errors.internal_error(f"mitmroute internal error in {addon_name}.{hook}")
        flows.refuse(target, err, getattr(addon, "shared", None))
        return
    if target.killable:
        target.kill()

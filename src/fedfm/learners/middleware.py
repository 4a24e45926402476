"""Client middleware: what a client does to its examples before training and to its
update after training, around any learner.

The one client function (``runtime/client.py``) runs a client's middleware on every
transport alike: ``before_train`` in config order, ``after_train`` in config order. A
client's middleware comes from its role (``federation.roles[].middleware``), so attacks
(``attacks/``), local noise or any other per-client behaviour is set by config alone.
Register with ``register_middleware(name, factory, params)``.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel

from fedfm.core.protocols import ClientMiddleware
from fedfm.core.registry import NoParams, Registry, parse_named

MiddlewareFactory = Callable[[BaseModel], ClientMiddleware]
middlewares: Registry[MiddlewareFactory] = Registry("federation.roles[].middleware")


def register_middleware(name: str, factory: MiddlewareFactory, params: type[BaseModel] = NoParams) -> MiddlewareFactory:
    return middlewares.register(name, factory, params)


def parse_middleware(spec: dict[str, Any], where: str) -> tuple[str, BaseModel]:
    return parse_named(middlewares, spec, where, "{name: sign_flip}")


def build_middleware(spec: dict[str, Any], where: str) -> ClientMiddleware:
    name, params = parse_middleware(spec, where)
    return middlewares.get(name).obj(params)


class PassThrough:
    """A base for middleware that acts on one side only."""

    name = "pass"

    def before_train(self, examples: list[dict], ctx) -> list[dict]:
        return examples

    def after_train(self, update, ctx):
        return update

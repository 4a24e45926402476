"""Types, Protocols and registries shared by every room; no room-specific logic lives here.

``types``: State, ServerState, Instruction, Update, ClientSpec. ``protocols``: the
contracts between the round loop and what plugs into it (Algorithm, ServerStep,
ClientMiddleware, ExchangePhase, Transport, RoundContext, Envelope, Reply).
``registry``: one Registry per extension point. ``exchanges``: the registry of extra
exchange phases. ``seeding``: the one ``derive_seed``.
"""

from fedfm.core.registry import Registry, RegistryError
from fedfm.core.seeding import derive_seed
from fedfm.core.state import fingerprint, state_num_params
from fedfm.core.types import MODEL, ClientSpec, Instruction, ServerState, State, Update

__all__ = [
    "MODEL",
    "ClientSpec",
    "Instruction",
    "Registry",
    "RegistryError",
    "ServerState",
    "State",
    "Update",
    "derive_seed",
    "fingerprint",
    "state_num_params",
]

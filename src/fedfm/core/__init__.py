"""Types and registries shared by every room; no room-specific logic lives here."""

from fedfm.core.registry import Registry, RegistryError
from fedfm.core.types import ClientSpec, Instruction, State, Update
from fedfm.core.state import fingerprint, state_num_params

__all__ = [
    "ClientSpec",
    "Instruction",
    "Registry",
    "RegistryError",
    "State",
    "Update",
    "fingerprint",
    "state_num_params",
]

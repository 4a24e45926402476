"""fedfm: federated learning with foundation models.

Rooms (see the package layout in the docs): ``core`` (types and registries),
``tasks``, ``data``, ``peft``, ``learners``, ``codecs``, ``aggregators``,
``runtime`` and ``report``. ``fedfm.config`` holds the experiment schema.
"""

__version__ = "0.1.0"

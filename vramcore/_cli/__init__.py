"""The ``vramcore`` command line, its demo and its benchmark: private to the core.

Plugins add commands through the ``vramcore_add_commands`` hook with the public names
:class:`vramcore.Commands`, :class:`vramcore.Console`, :class:`vramcore.UsageError` and the
``vramcore.EXIT_*`` codes; nothing else here is API. The console script is
``vramcore._cli.cli:main``.
"""

__all__: list[str] = []

"""Sub-commands of the ``diffcut`` console script (see :mod:`diffcut.cli`)."""

"""The command line: ``cbp COMMAND`` (:mod:`cbp.cli.commands`), its flags and config files
(:mod:`cbp.cli.options`, :mod:`cbp.cli.flags`), the guards of a run directory
(:mod:`cbp.cli.guards`) and the assembly of a training run (:mod:`cbp.cli.training`).

The top layer: nothing else in cbp imports it, except ``cbp.load_config`` (:mod:`cbp.cli.options`).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The ``cbp`` command (:func:`cbp.cli.commands.main`). Imported when called, so that
    ``import cbp`` (which reaches this package for ``cbp.load_config``) loads no command and
    no plotting library."""
    from .commands import main as run
    return run(argv)

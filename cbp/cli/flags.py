"""How a setting is read, from the command line or from a config file, the same way.

:func:`read_config` reads a TOML config (a file, or a packaged one); the value types
(``at_least``, ``random_seed``, ...) are argparse types; :class:`Flags` records a command's
flags by every name a config file may give them, holds their defaults (its parser stores only
what is given), and turns a config's values into what the flag would store, each checked as the
flag would check it.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


NOT_CONFIG_KEYS = ("config", "recipe")   # what chooses config files is not a key inside one
TABLES = ("pretrain", "quantize")   # the commands a config file configures
RECIPES = tuple(sorted(entry.name.removesuffix(".toml") for entry in
                       (resources.files("cbp") / "configs" / "recipes").iterdir()
                       if entry.name.endswith(".toml")))


def optional_float(text: str) -> float | None:
    """A float, or None for "none"/"off" (switches a reference extra off); "inf" is infinity."""
    return None if text.lower() in ("none", "off") else float(text)


def at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (sizes and counts; 0 or less is a mistake)."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return integer


def random_seed(text: str) -> int:
    """A random seed: an integer of 64 bits, what ``torch.manual_seed`` takes."""
    value = at_least(-2**63)(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
    return value


def temperature(text: str) -> float:
    """A sampling temperature: finite and >= 0.001 (the logits are divided by it: a smaller one
    overflows them to infinity, and 0.001 already all but always picks the likeliest token)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 1e-3 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0.001, got {text}")
    return value


def increments(text: str) -> tuple[tuple[float, float], ...]:
    """``10:1,100:10,inf:100`` as ``((10, 1), (100, 10), (inf, 100))``."""
    try:
        pairs = tuple(tuple(float(x) for x in pair.split(":")) for pair in text.split(","))
    except ValueError:
        pairs = ()
    if not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected BOUND:INCREMENT,..., e.g. 10:1,100:10,inf:100; "
                                         f"got {text!r}")
    return pairs



class Flags:
    """The flags of one command, by every name a config file may give them (dest or option).

    The command's parser stores only what the command line gives (``argument_default=SUPPRESS``);
    the defaults live here, so that :func:`parse_args` can tell a given setting from a default
    with one parse and merge defaults, config files and flags itself.
    """

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.by_key: dict[str, tuple[argparse.Action, bool]] = {}  # key -> (action, negated)
        self.defaults: dict = {}   # dest -> default, in the order of the flags
        self.actions: list[argparse.Action] = []

    def add(self, group, *flags: str, **kwargs) -> argparse.Action:
        """``group.add_argument``, its default kept here (the help still shows it)."""
        default = kwargs.pop("default", False if kwargs.get("action") == "store_true" else None)
        help = kwargs.get("help")
        if help not in (None, argparse.SUPPRESS):
            kwargs["help"] = help.replace("%(default)s", str(default))
        action = group.add_argument(*flags, **kwargs)
        self.actions.append(action)
        for option in action.option_strings:
            key = option.lstrip("-").replace("-", "_")
            negated = isinstance(action, argparse.BooleanOptionalAction) and option.startswith("--no-")
            self.by_key[key] = (action, negated)
        self.by_key.setdefault(action.dest, (action, False))
        if default is not argparse.SUPPRESS:
            self.defaults.setdefault(action.dest, default)
        return action

    def from_config(self, values: dict, name: str) -> dict:
        """A config's values by dest, each checked as the flag's value would be."""
        keys = {key: self.by_key.get(key.replace("-", "_")) for key in values}
        unknown = [key for key, entry in keys.items()
                   if entry is None or entry[0].dest in NOT_CONFIG_KEYS]
        if unknown:
            raise ValueError(f"config {name}: unknown key(s) {', '.join(unknown)} for "
                             f"`cbp {self.parser.prog.split()[-1]}`")
        settings = {}
        for key, (action, negated) in keys.items():
            try:
                settings[action.dest] = _config_value(action, negated, values[key])
            except argparse.ArgumentTypeError as err:   # a value the flag would refuse: as argparse
                self.parser.error(f"config {name}: argument {action.option_strings[0]}: {err}")
            except ValueError as err:
                raise ValueError(f"config {name}: {key} {err}") from None
        return settings


def _config_value(action: argparse.Action, negated: bool, value):
    """A TOML value as the flag's action would store it."""
    if action.nargs == 0:   # a switch
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value != negated
        return action.const if value else not action.const
    if isinstance(value, list):
        if action.nargs not in ("*", "+"):
            raise ValueError("takes one value, not a list")
        return [_convert(action, v) for v in value]
    converted = _convert(action, value)
    return [converted] if action.nargs in ("*", "+") else converted


def _convert(action: argparse.Action, value):
    """One value through the flag's type and choices; ``ArgumentTypeError`` in argparse's words."""
    if isinstance(value, dict):
        raise ValueError("is a table, not a value")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        result = action.type(text) if action.type is not None else text
    except argparse.ArgumentTypeError:
        raise
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"invalid {action.type.__name__} value: {text!r}") from None
    if action.choices is not None and result not in action.choices:
        raise argparse.ArgumentTypeError(f"invalid choice: {result!r} (choose from "
                                         f"{', '.join(map(repr, action.choices))})")
    return result


def read_config(name: str, command: str) -> dict:
    """The keys a TOML config gives ``command``: its ``[command]`` table, or its flat keys.

    A file holds either flat keys (for any command) or ``[pretrain]`` / ``[quantize]`` tables;
    anything else - another table, a flat key beside tables, no table for this command - is an
    error, not a silently ignored setting.
    """
    if os.path.exists(name):
        with open(name, "rb") as f:
            text = f.read()
    else:
        packaged = resources.files("cbp") / "configs" / f"{name}.toml"
        if not packaged.is_file():
            raise ValueError(f"config {name!r} is neither a file nor a packaged config")
        text = packaged.read_bytes()
    try:
        data = tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config {name} is not valid TOML: {err}") from err
    tables = [key for key, value in data.items() if isinstance(value, dict)]
    flat = [key for key, value in data.items() if not isinstance(value, dict)]
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ValueError(f"config {name}: unknown table [{unknown[0]}]; a config has [pretrain] "
                         "and/or [quantize] tables, or flat keys only")
    if not tables:
        return data
    if flat:
        raise ValueError(f"config {name}: key(s) {', '.join(flat)} outside the "
                         f"[{'] / ['.join(tables)}] table(s); move them into one")
    if command not in tables:
        raise ValueError(f"config {name} has no [{command}] table (it has "
                         f"[{'] / ['.join(tables)}])")
    return data[command]

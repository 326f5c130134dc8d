"""Command-line options from the families' settings schema: ``--set NAME=VALUE`` and each setting's aliases.

The CLI never names a setting: the flags (``Alias``) and their types come from the schema
(``vitedge.families.Setting``), so a family's new knob reaches every command that takes settings.
"""

from __future__ import annotations

import functools

import click

from .errors import VitedgeError
from .families import aliases, parse_assignment


def _alias_param(flag: str) -> str:
    return "alias_" + flag.lstrip("-").replace("-", "_")


def _parse_with(setting, many: bool):
    """A click callback parsing an alias's text by the setting's schema (``many``: one value per comma)."""

    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            if many:
                return [setting.parse(part) for part in value.split(",") if part.strip()]
            return setting.parse(value)
        except VitedgeError as exc:
            detail = f"expected comma-separated numbers ({exc}), got {value!r}" if many else str(exc)
            raise click.BadParameter(detail) from None

    return parse


def _parse_assignments(ctx, param, values):
    try:
        return [parse_assignment(text) for text in values]
    except VitedgeError as exc:
        raise click.BadParameter(str(exc)) from None


def setting_options(many: bool = False, from_file: bool = False):
    """``--set NAME=VALUE`` (repeatable) and the alias flags the families declare (``Alias``).

    The command receives ``settings`` ({name: value}); with ``many``, ``grid`` ({name: [values]},
    from ``many`` aliases); with ``from_file``, ``calibration`` (a file's path, from ``from_file``
    aliases). Values are typed by the families' schema, so a bad one is a
    usage error before anything runs."""
    chosen = [(flag, setting, alias) for flag, (setting, alias) in sorted(aliases().items())
              if (alias.many and many) or (alias.from_file and from_file) or not (alias.many or alias.from_file)]

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            settings, grid, files = {}, {}, {}
            for flag, setting, alias in chosen:
                value = kwargs.pop(_alias_param(flag))
                if value is not None:
                    target = grid if alias.many else files if alias.from_file else settings
                    if setting.name in target:
                        raise click.UsageError(f"{setting.name} is given twice (by {flag} and another flag)")
                    target[setting.name] = value
            for name, value in kwargs.pop("assignments"):
                if name in settings:
                    raise click.UsageError(f"{name} is given twice (--set {name}=... and a flag or another --set)")
                settings[name] = value
            if len(set(map(str, files.values()))) > 1:
                raise click.UsageError(f"give one calibration file, not several ({', '.join(map(str, files.values()))})")
            kwargs["settings"] = settings
            if many:
                kwargs["grid"] = grid
            if from_file:
                kwargs["calibration"] = next(iter(files.values()), None)
            return command(*args, **kwargs)

        for flag, setting, alias in reversed(chosen):
            kind = click.Path(dir_okay=False) if alias.from_file else None
            callback = None if alias.from_file else _parse_with(setting, alias.many)
            metavar = "FILE" if alias.from_file else "V1,V2,..." if alias.many else "VALUE"
            wrapper = click.option(flag, _alias_param(flag), type=kind, callback=callback, metavar=metavar,
                                   help=alias.help)(wrapper)
        return click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE", callback=_parse_assignments,
                            help="A family setting (see 'vitedge families'), typed by its schema; lists "
                                 "comma-separated; repeatable.")(wrapper)

    return decorate

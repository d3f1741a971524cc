"""The errors every stage raises; each message names the config key, file or shape at fault."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; the message names the offending key (dotted) or file."""


class ExportRefused(ValueError):
    """A teacher whose student no stock diffusers pipeline can sample; the message says why."""


class NonFiniteError(RuntimeError):
    pass

"""Every server-side function Tandem declares, from every domain's ``functions`` module: what
``tandem migrate`` grants the application's role EXECUTE on by name (those declared
``app_role``), and what the schema test checks. Add a domain's module to MODULES; its
declarations are found by type, so a new one cannot be left out."""

from __future__ import annotations

import tandem.scheduler.functions
import tandem.wallet.functions
from tandem.core.functions import ServerFunction

MODULES = (tandem.scheduler.functions, tandem.wallet.functions)

DECLARED: tuple[ServerFunction, ...] = tuple(
    value
    for module in MODULES
    for value in vars(module).values()
    if isinstance(value, ServerFunction)
)

"""Every table of Tandem, on one metadata: each domain's models, imported here so that
``metadata`` holds them all (what migrations' autogenerate compares with the database).
Import this module, not a domain's models, wherever the whole schema is meant."""

from __future__ import annotations

import tandem.access.models
import tandem.events.models
import tandem.scheduler.models
import tandem.wallet.models
from tandem.core.models import Base

metadata = Base.metadata

DOMAINS = (
    tandem.access.models,
    tandem.events.models,
    tandem.scheduler.models,
    tandem.wallet.models,
)

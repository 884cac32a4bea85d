"""Where a method declares its own recipe fields (a module of its own: methods and structured methods both
import it, and the registry imports them)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel


class MethodSettings(BaseModel):
    """The recipe fields of one method, declared next to it: `Recipe` takes the fields of every registered
    method's settings, and refuses those of another method than its own (unless they keep their defaults).
    A field added here stays out of the recipe's fingerprint while it holds its default."""

    applies_to: ClassVar[str]  # who may set them, as an error names it

    def needs_heldout(self) -> bool:
        """Whether the method scores its solve on held-out calibration tokens (the statistics keep some apart)."""
        return False

    def check_settings(self) -> None:
        """Rules across the method's own fields (raise ValueError); `Recipe` calls its method's, after the
        target's checks. `self` may be the recipe: read only the fields declared here."""


class NoSettings(MethodSettings):
    """A method without recipe fields of its own."""

    applies_to: ClassVar[str] = ""

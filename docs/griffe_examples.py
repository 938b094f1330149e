"""
A griffe extension for the API reference: an ``Example:`` section of a docstring is read as
Google style's ``Examples:`` (both are Google style; griffe knows only the plural), so its
doctest is shown as code rather than as Markdown, where ``>>>`` would open quote blocks.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class SingularExamples(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = SINGULAR.sub(r"\1Examples:", obj.docstring.value)

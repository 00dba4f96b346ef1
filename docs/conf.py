"""Sphinx configuration for the apsched-mongo documentation."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apsched_mongo import __version__

project = "apsched-mongo"
author = "apsched-mongo developers"
copyright = "apsched-mongo developers"
release = __version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"show-inheritance": False}

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []

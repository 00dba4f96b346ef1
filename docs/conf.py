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

# Wide enough at a 1280 px window for the signatures and option tables, which overflowed
# alabaster's default 940 px page (docs/_static/custom.css wraps what is still too long).
html_theme_options = {"page_width": "1180px", "sidebar_width": "230px"}
html_static_path = ["_static"]
html_css_files = ["custom.css"]

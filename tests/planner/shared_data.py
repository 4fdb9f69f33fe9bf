"""Where the real public data lives: ``$SKYFLEET_TEST_DATA_DIR``, else ``shared/data`` beside the repository
(its README gives sources and licences). Tests that need it fail, never skip, when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

DATA = Path(os.environ.get("SKYFLEET_TEST_DATA_DIR")
            or Path(__file__).resolve().parents[2].parent / "shared" / "data")

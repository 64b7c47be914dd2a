"""Where the project's shared real data live, and the marker that skips tests when they are absent.

Users do not have ``../shared``; tests that read it skip cleanly without it.
"""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CRYOEM = SHARED / "cryoem"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="shared data folder not available")

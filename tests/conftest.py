"""Makes the format fixtures (tests/fixtures/data_formats.py) importable as ``data_formats`` by every test."""

import sys
from pathlib import Path

_FIXTURES = str(Path(__file__).parent / "fixtures")
if _FIXTURES not in sys.path:
    sys.path.insert(0, _FIXTURES)

"""Where the shared real scans are: ``../shared/realdata`` beside the repository.

Tests that read them skip when the folder (or the file they need) is absent.
"""

from pathlib import Path

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"

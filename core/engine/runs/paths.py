"""Where runs live: checkpoints/ (shipped with the repository) and runs/ (made on this machine)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SHIPPED_DIR = ROOT / "checkpoints"
LOCAL_DIR = ROOT / "runs"

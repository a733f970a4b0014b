"""Where the project's shared protocol documents are: ../shared beside the checkout
(I2V_SHARED_DIR overrides)."""

import os
from pathlib import Path


def shared_file(relative: str) -> Path:
    if os.environ.get("I2V_SHARED_DIR"):
        return Path(os.environ["I2V_SHARED_DIR"]) / relative
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / relative
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"shared/{relative} not found beside the checkout; set I2V_SHARED_DIR")


OBJECT_INFO = shared_file("protocols/object_info.json")

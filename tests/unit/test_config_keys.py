"""The flat config keys are a public interface: users' YAML files, CLI flags and saved effective configs use
them. Renaming or removing one breaks those configs, so the full list is frozen in tests/golden/config_keys.txt
and changes only when someone edits that file on purpose.
"""

from __future__ import annotations

from scaletune.config import load_config
from support.golden import GOLDEN_DIR

KEYS_FILE = GOLDEN_DIR / "config_keys.txt"


def test_flat_config_keys_equal_the_frozen_list():
    # Config() alone refuses a run without training data; any train_file gives the same keys.
    keys = sorted(load_config({"train_file": "train.csv"}).to_dict())
    frozen = KEYS_FILE.read_text().split()
    added, removed = sorted(set(keys) - set(frozen)), sorted(set(frozen) - set(keys))
    assert keys == frozen, (
        f"config keys changed. Added: {added or 'none'}. Removed: {removed or 'none'}.\n"
        f"A removed or renamed key breaks every user config that sets it: keep the old name working (or "
        f"document the break). Then update {KEYS_FILE} deliberately, sorted, one key per line; a new key "
        f"needs only that.")

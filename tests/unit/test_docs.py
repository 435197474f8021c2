"""The README tells the truth: two quickstart commands, CI runs the second, the reference is current."""

import re

from scaletune.config import load_config, reference_markdown
from support.tiny import REPO

README = (REPO / "README.md").read_text()


def quickstart_blocks():
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def test_quickstart_has_exactly_two_bash_blocks_and_ci_runs_the_second():
    blocks = quickstart_blocks()
    assert len(blocks) == 2
    assert "accelerate launch -m scaletune.train" in blocks[0] and "install" in blocks[0]
    test_command = blocks[1].strip()
    assert "pytest" in test_command
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_configuration_reference_is_generated_from_the_dataclasses():
    current = README.split("<!-- reference:start -->", 1)[1].split("<!-- reference:end -->", 1)[0].strip()
    assert current == reference_markdown().strip(), "regenerate: python -m scaletune.config"


def test_every_packaged_recipe_is_a_valid_config():
    recipes = sorted((REPO / "src" / "scaletune" / "recipes").glob("*.yaml"))
    assert {"demo", "imdb_bert"} <= {p.stem for p in recipes}
    for path in recipes:
        cfg = load_config([path.stem])
        assert cfg.training.output_dir

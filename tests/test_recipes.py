"""Every YAML recipe in recipes/ is a complete, valid configuration for its subcommand."""

from pathlib import Path

import pytest
import yaml

from litft.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml"))


def subcommand_for(recipe: Path) -> list[str]:
    method = recipe.stem
    return ["finetune", method]


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_parses_with_every_key_known(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*subcommand_for(recipe), "--config", str(recipe), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(recipe.read_text())
    for key, value in written.items():
        if isinstance(value, dict):
            for inner_key, inner_value in value.items():
                assert printed[key][inner_key] == inner_value, (key, inner_key)
        else:
            assert str(printed[key]) == str(value), key

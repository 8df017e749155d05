"""The generated reference pages match the code (tools/gen_reference.py): docs/configuration.md from `ALPConfig`,
the flag tables of docs/cli.md from the commands' parsers. A failure here means a field or a flag changed: run
`make reference` (or `python tools/gen_reference.py`) and commit the pages."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "tools" / "gen_reference.py")
gen = sys.modules["gen_reference"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


@pytest.fixture(scope="module")
def pages():
    return gen.pages()


@pytest.mark.parametrize("page", [gen.CONFIG_PAGE, gen.CLI_PAGE], ids=lambda p: p.name)
def test_the_generated_page_is_up_to_date(pages, page):
    assert page.read_text() == pages[page], f"docs/{page.name} is stale: run `make reference` and commit it"


def test_every_alp_field_has_one_docstring_entry_with_its_default():
    assert gen.config_problems() == []


def test_the_configuration_page_is_organised_by_the_docstring_groups(pages):
    from trl_alp.config import ALPConfig

    _, groups = gen.docstring_groups(ALPConfig.__doc__)
    headings = re.findall(r"^## (.+)$", pages[gen.CONFIG_PAGE], flags=re.M)
    assert headings == list(groups)
    assert "*optional*" not in pages[gen.CONFIG_PAGE]  # the docstring's type markup is not shown raw
    for name in gen.alp_fields():
        assert f"| `{name}` |" in pages[gen.CONFIG_PAGE]


def test_every_command_and_every_flag_is_on_the_cli_page(pages):
    from trl_alp.cli.main import COMMANDS, PARSERS, command_parser

    assert {name.split()[0] for name in PARSERS} == set(COMMANDS)
    text = pages[gen.CLI_PAGE]
    for name in PARSERS:
        assert f"<!-- generated: {name} (" in text
        if name == "train":
            continue  # TRL's GRPOConfig flags are named, not listed; the test below covers ALP's
        for action in command_parser(name)._actions:
            flag = action.option_strings[0] if action.option_strings else action.dest
            assert flag in ("-h", "--no_" + action.dest) or f"`{flag}" in text, (name, flag)


def test_the_train_table_names_every_alp_field(pages):
    for name in gen.alp_fields():
        assert f"`--{name}`" in pages[gen.CLI_PAGE]


def test_table_cells_escape_pipes_outside_code_only():
    assert gen.cell("c·|A| and `a | b`\n  more") == r"c·\|A\| and `a | b` more"
    assert gen.type_name(int | None) == "int | None"
    assert gen.type_name(list[str]) == "list[str]"


def test_the_check_mode_reports_a_stale_page(tmp_path, monkeypatch):
    fresh = gen.pages()
    config, stale = tmp_path / "configuration.md", tmp_path / "cli.md"
    config.write_text(fresh[gen.CONFIG_PAGE])
    stale.write_text(fresh[gen.CLI_PAGE].replace("| `--seeds` |", "| `--seedz` |"))
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "CONFIG_PAGE", config)
    monkeypatch.setattr(gen, "CLI_PAGE", stale)
    assert gen.main(["--check"]) == 1
    assert "--seedz" in stale.read_text()  # --check writes nothing
    assert gen.main([]) == 0 and "--seedz" not in stale.read_text()

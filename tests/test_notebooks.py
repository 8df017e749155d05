"""Execute every cell of the Colab notebooks in smoke mode (tiny in-code model, offline, CPU) and check their effects.

The kernel is the ``python3`` kernelspec of the environment running pytest: jupyter_client replaces a spec's
``python`` executable by ``sys.executable``, and ipykernel provides the spec when none is registered.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
QUICKSTART = "alp_grpo_lora_quickstart"
MISMATCH = "alp_vs_baselines_mismatch"
NOTEBOOKS = [QUICKSTART, MISMATCH]
SMOKE_STEPS = 2
CELL_TIMEOUT_S = 300


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


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
    """Valid nbformat, Colab-ready metadata, no outputs, and a parameters cell first that reads the smoke flag."""
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in _code_cells(nb):
        assert cell.outputs == [], f"{name}: a code cell has saved outputs"
        assert cell.execution_count is None, f"{name}: a code cell has an execution count"
    first = _code_cells(nb)[0].source
    assert "TRL_ALP_NOTEBOOK_SMOKE" in first and "TRL_ALP_NOTEBOOK_OUT" in first
    install = [c.source for c in _code_cells(nb) if "%pip install" in c.source]
    assert len(install) == 1 and install[0].count("%pip install") == 2, "one install cell: checkout or REPO_URL"
    assert "if SMOKE:" in install[0], "the install cell must be smoke-guarded"
    assert "<org>" not in json.dumps(nb), "a placeholder the user must edit"


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


CHECKS = {QUICKSTART: _check_quickstart, MISMATCH: _check_mismatch}


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


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_installs_the_checkout_or_asks_for_repo_url(name, tmp_path, monkeypatch):
    """Outside smoke mode, with %pip recorded instead of run: from the checkout's notebooks/ folder the cell installs
    that checkout; elsewhere it installs REPO_URL, and stops with a one-line instruction while REPO_URL is empty."""
    _environment(monkeypatch, smoke="0", out=tmp_path / "out")
    nb = _read(name)
    parameters, install = _code_cells(nb)[0].source, _source(nb, "from pathlib import Path")
    elsewhere = tmp_path / "colab"
    elsewhere.mkdir()
    cells = _run_cells(
        [
            FAKE_PIP,
            parameters,
            install,  # the kernel starts in the checkout's notebooks/ folder
            f"os.chdir({str(elsewhere)!r}); REPO_URL = 'https://example.org/trl-alp.git'",
            install,
            "REPO_URL = ''",
            install,
        ],
        cwd=NOTEBOOK_DIR,
    )
    root = NOTEBOOK_DIR.parent
    assert cells[2].outputs[0]["text"] == f'PIP install -q -e "{root}[plot]"\n'
    assert cells[4].outputs[0]["text"] == 'PIP install -q "trl-alp[plot] @ git+https://example.org/trl-alp.git"\n'
    (error,) = [out for out in cells[6].outputs if out.output_type == "error"]
    assert (error.ename, error.evalue) == (
        "SystemExit",
        "Set REPO_URL in the parameters cell to the trl-alp git repository, then run all cells again.",
    )


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
        sources += [_code_cells(nb)[0].source, _fake_runtime(*runtime), _source(nb, "import gc")]
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

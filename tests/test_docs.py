"""The documentation as a newcomer uses it: the README is a short front door from which every page is one click
away, every link lands on a file and heading that exist, every command in every page parses and names only
options and config keys that exist (each entry point's own parser, the config's own loader, the Makefile's
targets and variables), the two worked examples (a new pooling head, a new backbone) run as written, and the
package's imports run one way."""

import ast
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from bcnn import eval as eval_cli
from bcnn import export as export_cli
from bcnn import onnx_predict
from bcnn import predict as predict_cli
from bcnn import report as report_cli
from bcnn import train as train_cli
from bcnn.bench import __main__ as bench_cli
from bcnn.config import load_config
from bcnn.data import __main__ as data_cli
from bcnn.data import write_synthetic_cub
from bcnn.bench import sqrt_backward, sqrt_sweep
from bcnn.models.backbones import FAMILIES, build_backbone
from bcnn.models.pooling import HEADS
from helpers.runs import REPO, small_run_args

PAGES = sorted([REPO / "README.md", REPO / "data" / "README.md", *(REPO / "docs").glob("*.md")])
README_MAX_LINES = 200  # issue 21: a front door, "at most about 200 lines"


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in without_fences(page.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", without_fences(page.read_text()))


def test_the_readme_is_a_short_front_door_with_every_page_one_click_away():
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= README_MAX_LINES
    linked = {(readme.parent / target.split("#")[0]).resolve() for target in links(readme)
              if not target.startswith(("http:", "https:", "#"))}
    pages = {page.resolve() for page in PAGES} - {readme.resolve()}
    assert not pages - linked, f"pages the README does not link: {sorted(map(str, pages - linked))}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_lands_on_a_file_and_heading_that_exist(page):
    for target in links(page):
        if target.startswith(("http:", "https:", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        assert destination.exists(), f"{page_id(page)} links {target}, which does not exist"
        if anchor:
            assert anchor in heading_anchors(destination), f"{page_id(page)} links {target}: no such heading"


# --- Commands -------------------------------------------------------------------------------------------------

def fenced_commands(text: str) -> list[str]:
    """The command lines of the page's bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a comment (a #SBATCH line is one, for bash)
            if line:
                commands.append(line)
    return commands


def inline_commands(text: str) -> list[str]:
    """Commands quoted in the prose: `python -m bcnn...` and `make ...` spans, with no placeholders in them."""
    spans = re.findall(r"`((?:\.venv/bin/)?python -m bcnn\.[^`]+|make [a-z][^`]*)`", without_fences(text))
    return [span for span in spans if not re.search(r"\.\.\.|[<>|*\[\]]|\bN\b", span)]


def all_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        found += [(page_id(page), command) for command in fenced_commands(text) + inline_commands(text)]
    return found


def makefile():
    text = (REPO / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY: (.+)$", text, flags=re.M).group(1).split())
    variables = set(re.findall(r"\$\(([A-Z_]+)\)", text)) | set(re.findall(r"^([A-Z_]+) *\??=", text, flags=re.M))
    return phony, variables


def check_bcnn_command(module: str, argv: list[str]) -> None:
    """Parse argv with the entry point's own parser (argparse exits on an unknown option); for training, load
    the config with its overrides too, which refuses an unknown key or a value out of range."""
    if module == "bcnn.train":
        args, overrides = train_cli.parse_args(argv)
        load_config(REPO / args.config, overrides)
        return
    parsers = {"bcnn.eval": eval_cli.parse_args, "bcnn.predict": predict_cli.parse_args,
               "bcnn.report": report_cli.parse_args, "bcnn.bench": bench_cli.parse_args,
               "bcnn.data": data_cli.parse_args, "bcnn.bench.sqrt_sweep": sqrt_sweep.parse_args,
               "bcnn.bench.sqrt_backward": sqrt_backward.parse_args, "bcnn.export": export_cli.parse_args,
               "bcnn.onnx_predict": onnx_predict.parse_args}
    assert module in parsers, f"no parser known for {module}"
    parsers[module](argv)


def check_make_command(words: list[str]) -> None:
    phony, variables = makefile()
    for word in words[1:]:
        if "=" in word:
            assert word.split("=")[0] in variables, f"the Makefile has no variable {word.split('=')[0]}"
        else:
            assert word in phony, f"the Makefile has no target {word}"


@pytest.fixture
def examples_registered():
    """The worked examples of docs/heads.md and docs/backbones.md, run as written; gone again afterwards, so
    that no other test sees a head or backbone the package does not have."""
    for page in ("heads.md", "backbones.md"):
        for block in re.findall(r"^```python\n(.*?)^```", (REPO / "docs" / page).read_text(), flags=re.S | re.M):
            exec(compile(block, f"docs/{page}", "exec"), {"__name__": f"docs_{page[:-3]}"})
    yield
    HEADS.pop("covariance", None)
    FAMILIES.pop("resnet18", None)


@pytest.mark.parametrize("page, command", all_commands(), ids=lambda value: str(value)[:80])
def test_every_command_in_the_docs_parses_and_names_real_options(page, command, examples_registered, capsys):
    words = shlex.split(command.split(" > ")[0])  # a redirection of the output is the shell's
    if words[0] == "make":
        check_make_command(words)
        return
    if "-m" not in words or not words[words.index("-m") + 1].startswith("bcnn."):
        pytest.skip(f"not a bcnn command ({words[0]}): git, pip, srun and tensorboard are theirs")
    at = words.index("-m")
    try:
        check_bcnn_command(words[at + 1], words[at + 2:])
    except SystemExit:
        pytest.fail(f"{page}: `{command}` does not parse: {capsys.readouterr().err.strip()}")


def test_the_docs_show_the_commands_users_run_first():
    commands = [command for _, command in all_commands()]
    for expected in ("make demo", "make test", "make data", "make stage1", "make stage2"):
        assert expected in commands
    assert any("bcnn.eval --split test" in command for command in commands)


# --- The worked examples --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return write_synthetic_cub(tmp_path_factory.mktemp("docs") / "cub", classes=3, per_class=6, seed=0)


def test_the_worked_head_is_the_centred_covariance_and_trains_and_evaluates(examples_registered, cub, tmp_path):
    head = HEADS["covariance"](channels=6)
    x = torch.randn(2, 6, 5, 4)
    # The same formula in float64 NumPy: centre each channel over positions, X Xᵀ / HW, signed sqrt, L2
    features = x.double().numpy().reshape(2, 6, 20)
    centred = features - features.mean(axis=2, keepdims=True)
    covariance = np.einsum("bcp,bdp->bcd", centred, centred).reshape(2, 36) / 20
    root = np.sqrt(np.maximum(covariance, 0) + 1e-5) - np.sqrt(np.maximum(-covariance, 0) + 1e-5)
    expected = root / np.linalg.norm(root, axis=1, keepdims=True)
    # float32 rounding of a 20-term sum and a square root: a few u of 2^-24 on values of order 0.1
    np.testing.assert_allclose(head(x).numpy(), expected, rtol=0, atol=1e-6)
    assert head.cacheable and head.output_dim == 36

    run_dir = tmp_path / "run"
    train_cli.main(small_run_args(cub, run_dir, "--model.pooling=covariance", "--train.epochs=1"))
    result = eval_cli.main(["--checkpoint", str(run_dir / "best.pt"), "--split", "test", "--no-figures"])
    assert result["count"] == 9 and 0 <= result["top1"] <= 100


def test_the_worked_backbone_builds_with_the_channels_and_stride_it_states_and_trains(examples_registered, cub,
                                                                                       tmp_path):
    for cut, channels, stride in (("layer4", 512, 32), ("layer3", 256, 16)):
        backbone = build_backbone("resnet18", "none", cut)
        assert (backbone.channels, backbone.stride) == (channels, stride)
        assert backbone.module(torch.randn(1, 3, 64, 64)).shape == (1, channels, 64 // stride, 64 // stride)
    run_dir = tmp_path / "run"
    train_cli.main(small_run_args(cub, run_dir, "--model.backbone=resnet18", "--model.backbone_weights=none",
                                  "--model.pooling=avg", "--train.epochs=1"))
    assert (run_dir / "best.pt").exists()


# --- Imports --------------------------------------------------------------------------------------------------

def bcnn_imports() -> dict[str, set[str]]:
    """Each bcnn module's imports of other bcnn modules, at module level or inside functions."""
    modules = {}
    for path in (REPO / "bcnn").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bcnn"):
                for alias in node.names:  # `from bcnn import eval` names a module, `from bcnn.x import f` a name
                    targets.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                                else node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("bcnn")}
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def test_bcnn_has_no_import_cycle():
    graph = bcnn_imports()
    assert "bcnn.bench.steps" in graph and "bcnn.bench.recipe" in graph  # the walk sees the package
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            # a package's __init__ importing its own submodules is how a package is made, not a cycle
            if module == target.rpartition(".")[0] or target == module.rpartition(".")[0]:
                continue
            assert state.get(target) != "open", f"import cycle: {' -> '.join(path + [module, target])}"
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])

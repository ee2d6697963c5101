"""The CLI as a user meets it: command discovery, plugins, errors, version."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

# every built-in command, as pyproject.toml registers it (the same entry-point group a plugin uses)
BUILTINS = list(
    tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["llmctl.commands"]
)


def make_dist_info(root: Path, name: str, entry_points: str, module: str | None = None) -> Path:
    """A minimal installed distribution: what importlib.metadata sees for a pip-installed plugin."""
    dist = root / f"{name.replace('-', '_')}-0.0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    if module is not None:
        (root / f"{name.replace('-', '_')}.py").write_text(module)
    return root


def test_help_lists_every_command_and_plugins(llmctl):
    result = llmctl("--help", check=True)
    for name in [*BUILTINS, "plugins"]:
        assert f" {name} " in result.stdout, name
    assert "warning" not in result.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys; sys.argv = ['llmctl', '--help']\n"
        "from llmctl.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT', file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stderr.strip().endswith("LIGHT")


def test_version_and_subcommand_help(llmctl):
    assert llmctl("--version", check=True).stdout.startswith("llmctl ")
    for name in BUILTINS:
        assert llmctl(name, "--help").returncode == 0, name


def test_plugins_table_shows_every_builtin_with_its_source(llmctl):
    out = llmctl("plugins", check=True).stdout
    for name in BUILTINS:
        row = next(line for line in out.splitlines() if f" {name} " in line)
        assert "llmctl" in row and "built-in" in row and "ok" in row


def test_installed_example_plugin_appears_and_runs(llmctl, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO / "plugins" / "llmctl-hello"),
        ],
        check=True,
        capture_output=True,
    )
    assert " hello " in llmctl("--help", pythonpath=[target], check=True).stdout
    result = llmctl("hello", "--name", "team", pythonpath=[target], check=True)
    assert "Hello, team!" in result.stdout
    listing = llmctl("plugins", pythonpath=[target], check=True).stdout
    row = next(line for line in listing.splitlines() if " hello " in line)
    assert "llmctl-hello" in row and "0.1.0" in row and "plugin" in row and "ok" in row


def test_broken_plugin_warns_once_and_the_rest_still_works(llmctl, tmp_path):
    site = make_dist_info(
        tmp_path,
        "llmctl-broken",
        "[llmctl.commands]\nbroken = llmctl_broken:app\n",
        module="raise RuntimeError('this plugin is broken on purpose')\n",
    )
    result = llmctl("--help", pythonpath=[site])
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "broken" in warnings[0] and "RuntimeError" in warnings[0]
    assert " train " in result.stdout
    dry = llmctl("train", "recipes/tiny.toml", "--dry-run", pythonpath=[site])
    assert dry.returncode == 0 and "Traceback" not in dry.stderr
    assert "error: RuntimeError" in llmctl("plugins", pythonpath=[site]).stdout


def test_plugin_cannot_shadow_a_builtin(llmctl, tmp_path):
    site = make_dist_info(
        tmp_path,
        "llmctl-evil",
        "[llmctl.commands]\ntrain = llmctl_evil:train\n",
        module="def train():\n    print('HIJACKED')\n",
    )
    result = llmctl("train", "recipes/tiny.toml", "--dry-run", pythonpath=[site])
    assert result.returncode == 0 and "HIJACKED" not in result.stdout
    assert "already provided by llmctl" in result.stderr


def test_misspelt_recipe_key_is_one_line_exit_2(llmctl_in_process, tmp_path):
    recipe = tmp_path / "typo.toml"
    recipe.write_text('extends = "%s"\n[train]\nlerning_rate = 1e-3\n' % (REPO / "recipes" / "tiny.toml"))
    result = llmctl_in_process("train", str(recipe), "--dry-run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "train.lerning_rate" in lines[0] and "did you mean optim.lr" in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.seq_len=512"], "train.seq_len (512) exceeds model.max_seq_len (256)"),
        (["--nproc", "2", "--set", "train.global_batch_size=12"], "must be a multiple of"),
        (["--set", "data.tokens=/no/[red]tokens"], "/no/[red]tokens has no"),  # Rich markup stays literal
    ],
)
def test_a_recipe_the_trainer_would_refuse_is_one_line_before_anything_starts(
    llmctl_in_process, tmp_path, monkeypatch, args, message
):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{REPO / "recipes" / "tiny.toml"}"\n[data]\ntokens = "{tmp_path}/none"\n')
    monkeypatch.chdir(tmp_path)
    result = llmctl_in_process("train", str(recipe), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]  # no run directory left behind


def test_set_override_with_unknown_key_names_it(llmctl_in_process):
    result = llmctl_in_process("train", "recipes/tiny.toml", "--dry-run", "--set", "model.d_modle=64")
    assert result.returncode == 2 and "model.d_modle" in result.stderr and "model.d_model" in result.stderr


def test_1_3b_dry_run_prints_exact_parameters_and_memory(llmctl_in_process):
    from llmctl.recipe import load_recipe

    expected = load_recipe(REPO / "recipes" / "1.3b.toml").model.to_config().num_parameters()
    assert 1.25e9 < expected < 1.40e9
    out = llmctl_in_process("train", "recipes/1.3b.toml", "--dry-run", "--nproc", "8", check=True).stdout
    assert f"{expected:,}" in out
    assert "memory per device (estimate)" in out and "fsdp" in out and "bf16" in out


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.toml")), ids=lambda path: path.name)
def test_every_shipped_recipe_loads(path):
    from llmctl.recipe import load_recipe

    assert load_recipe(path).model.to_config().num_parameters() > 0


def test_the_speculative_target_is_the_decode_benchmarks_134m_shape_and_its_draft_shares_its_vocabulary():
    from benchmarks.decode import SHAPES
    from llmctl.recipe import load_recipe

    target = load_recipe(REPO / "recipes" / "speculative-134m.toml")
    draft = load_recipe(REPO / "recipes" / "speculative-draft.toml")
    assert target.model.to_config().num_parameters() == SHAPES["134m"].num_parameters()
    assert draft.model.vocab_size == target.model.vocab_size and draft.data.tokenizer == target.data.tokenizer
    assert draft.model.to_config().num_parameters() < target.model.to_config().num_parameters() / 10
    assert draft.distill.teacher == target.checkpoint.dir

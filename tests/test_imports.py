"""Start-up promises, checked by what gets imported (timings belong in benchmarks/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_validate_and_help_do_not_import_torch(tmp_path: Path) -> None:
    from .test_execute import write_adapter

    for i in range(2):
        write_adapter(tmp_path / f"c{i}", modules=2, seed=i, loss=1.0 + i)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"checkpoints: [{tmp_path}/c0, {tmp_path}/c1]\noutput: {tmp_path}/out\n", encoding="utf-8"
    )
    # Full validate reads configs, headers and metrics (JSON), the schema-only one the recipe:
    # neither needs torch.
    _run(
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mwakit.cli import main\n"
        "r = CliRunner().invoke(main, ['validate', '--schema-only', "
        "'examples/configs/mwa-loss.yaml'])\n"
        "assert r.exit_code == 0, r.output\n"
        f"r = CliRunner().invoke(main, ['validate', '{recipe}'])\n"
        "assert r.exit_code == 0 and '2 adapters' in r.output, r.output\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )


def test_merge_path_does_not_import_transformers_or_peft(tmp_path: Path) -> None:
    from .test_execute import write_adapter

    for i in range(2):
        write_adapter(tmp_path / f"c{i}", modules=2, seed=i, loss=1.0 + i)
    _run(
        "import sys, mwakit\n"
        "from mwakit.recipe import parse_recipe\n"
        f"r = parse_recipe({{'checkpoints': ['{tmp_path}/c0', '{tmp_path}/c1'],\n"
        f"    'output': '{tmp_path}/out', 'device': 'cpu'}})\n"
        "mwakit.run(r)\n"
        "heavy = [m for m in ('transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )

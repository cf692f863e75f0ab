"""The console script and the probe."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from decomp.rl import group_advantages
from decomp.training.cli import main


def test_group_advantages_match_a_direct_computation():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    adv = group_advantages(r, 4)
    for g in range(2):
        x = r[4 * g : 4 * g + 4]
        assert torch.allclose(adv[4 * g : 4 * g + 4], (x - x.mean()) / (x.std() + 1e-6))
    assert torch.equal(group_advantages(torch.ones(4), 2), torch.zeros(4))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(r, 3)


def test_probe_json_records(capsys):
    assert main(["probe", "--prompts", "2", "--group-size", "4", "--json"]) == 0
    records = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert set(records) == {"ce", "policy"}
    for rec in records.values():
        for key in ("correlation", "penalty", "coef_masked", "coef_jvp_pooled", "coef_trust_region",
                    "efficiency_pooled", "lambda_hat", "gain_hat"):
            assert key in rec
        assert rec["optimizer"] == "adamw" and rec["split"] == "train"
        assert rec["lambda_hat_reason"] != "not searched"
        assert math.isclose(rec["predicted"], rec["correlation"] + rec["cross"] - rec["penalty"], rel_tol=1e-12)


def test_console_script_errors_exit_2():
    out = subprocess.run([sys.executable, "-m", "decomp.training.cli", "probe", "--lr", "-1"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "must be a non-negative number" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "decomp.training.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("decomp ")


@pytest.mark.parametrize("command", ["run", "compare"])
def test_help_config_and_missing_out(command, capsys, tmp_path):
    assert main([command, "--help-config"]) == 0
    assert "mtp_scale" in capsys.readouterr().out
    assert main([command]) == 2
    assert f"decomp {command}: error: --out is required" in capsys.readouterr().err
    if command == "compare":
        assert main([command, "--out", str(tmp_path), "--regimes", ","]) == 2
        assert "--regimes and --seeds must each name at least one value" in capsys.readouterr().err
    assert main(["validate"]) == 2 and "no run directories given" in capsys.readouterr().err

"""The `rayfleet` command: a fast --help, argument -> config mapping, Ray auth, offline commands.

`rayfleet serve` end to end (a real local cluster, Ctrl-C) is in tests/test_serve_cli.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rayfleet.cluster import cli

ROOT = Path(__file__).resolve().parent.parent


def run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_importing_the_cli_imports_neither_ray_nor_torch():
    r = run_py(
        "import sys, rayfleet.cluster.cli\n"
        "bad = [m for m in ('ray', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    assert r.returncode == 0, r.stderr


def test_help_lists_the_commands():
    r = subprocess.run(
        [sys.executable, "-m", "rayfleet.cluster.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0
    for cmd in ("serve", "generate", "chat", "model", "bench"):
        assert cmd in r.stdout


def test_serve_help_does_not_import_ray():
    r = run_py(
        "import sys\nfrom rayfleet.cluster import cli\n"
        "try:\n    cli.main(['serve', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules"
    )
    assert r.returncode == 0, r.stderr
    assert "--address" in r.stdout and "CONFIG" in r.stdout.upper()


def parse(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_serve_flags_become_config_fields():
    args = parse(
        "--port", "9001", "--host", "0.0.0.0", "--model", "/m/x", "--num-replicas", "2",
        "--api-key", "a", "--api-key", "b", "--set", "engine.block_size=32",
        "--set", "replica.max_ongoing_requests=64",
    )  # fmt: skip
    cfg = cli.load_serve_config(args)
    assert (cfg.server.port, cfg.server.host) == (9001, "0.0.0.0")
    assert cfg.model.path == "/m/x" and cfg.replica.num_replicas == 2
    assert cfg.server.resolved_api_keys() == ["a", "b"]
    assert cfg.engine.block_size == 32 and cfg.replica.max_ongoing_requests == 64


def test_serve_with_a_config_file_and_an_override():
    args = parse(str(ROOT / "configs" / "default.yaml"), "--port", "8123")
    cfg = cli.load_serve_config(args)
    assert cfg.server.port == 8123 and cfg.engine.device == "cpu"


def test_serve_without_arguments_is_the_default_config_on_every_core():
    """The built-in defaults, except that the one replica's engine uses every core (as
    configs/default.yaml does): left unset, Ray would give its torch one thread."""
    from rayfleet.cluster.config import RayfleetConfig

    cfg = cli.load_serve_config(parse())
    assert cfg.engine.num_threads == 0
    assert cfg.engine_config().num_threads == 0
    assert cfg.model_copy(update={"engine": RayfleetConfig().engine}) == RayfleetConfig()
    # Several replicas, a config file, or an explicit --set keep their own thread counts.
    assert cli.load_serve_config(parse("--num-replicas", "2")).engine.num_threads is None
    assert cli.load_serve_config(parse("--set", "engine.num_threads=1")).engine.num_threads == 1
    yaml_cfg = cli.load_serve_config(parse(str(ROOT / "configs" / "default.yaml")))
    assert yaml_cfg.engine.num_threads == 0


def test_bad_config_exits_2_naming_the_field_before_starting_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  blok_size: 3\n")
    r = run_py(
        "import sys\nfrom rayfleet.cluster import cli\n"
        f"rc = cli.main(['serve', {str(bad)!r}])\n"
        "assert 'ray' not in sys.modules\nsys.exit(rc)"
    )
    assert r.returncode == 2, r.stderr
    assert "engine.blok_size" in r.stderr


def test_bad_set_syntax_is_refused():
    with pytest.raises(SystemExit):
        cli.load_serve_config(parse("--set", "no-equals-sign"))


@pytest.fixture
def clean_auth_env(monkeypatch, tmp_path):
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(k, "")  # recorded, so whatever setup_ray_auth sets is undone
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_ray_auth_makes_a_run_token_without_writing_files(clean_auth_env):
    token = cli.setup_ray_auth("token")
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert token and os.environ["RAY_AUTH_TOKEN"] == token and len(token) == 64
    assert list(clean_auth_env.iterdir()) == []


def test_ray_auth_uses_an_existing_token_file(clean_auth_env):
    (clean_auth_env / ".ray").mkdir()
    (clean_auth_env / ".ray" / "auth_token").write_text("t" * 64)
    assert cli.setup_ray_auth("token") is None
    assert os.environ["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in os.environ


def test_ray_auth_disabled_and_explicit_mode_wins(clean_auth_env, monkeypatch):
    assert cli.setup_ray_auth("disabled") is None
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert cli.setup_ray_auth("disabled") is None
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_model_path_prints_the_default_model_folder(capsys):
    from rayfleet.engine import default_model_path

    assert cli.main(["model", "path"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == default_model_path()
    assert (Path(out) / "config.json").is_file()


def test_generate_and_chat_offline(capsys):
    assert (
        cli.main(["generate", "--max-tokens", "4", "--max-model-len", "256", "Once", "upon"]) == 0
    )
    assert capsys.readouterr().out.strip()
    assert cli.main(["chat", "--max-tokens", "8", "--max-model-len", "256", "What is 2+2?"]) == 0
    assert capsys.readouterr().out.strip()

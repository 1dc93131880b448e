from pathlib import Path

import pytest
import yaml

from app.config import ConfigError, Settings, load_settings, settings_from_args

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "ray_config.yaml"


def test_shipped_config_validates_and_is_a_serve_config():
    from ray.serve.schema import ServeDeploySchema

    settings = load_settings(CONFIG)
    assert settings.serving.max_k == 200
    ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))


def test_shipped_config_spells_out_every_setting():
    """Every setting is written (with its comment) in the file, so a user sees all knobs."""
    args = next(a for a in yaml.safe_load(CONFIG.read_text())["applications"] if a["name"] == "echotune")["args"]
    for section, model in Settings.model_fields.items():
        assert section in args, section
        missing = set(model.annotation.model_fields) - set(args[section])
        assert not missing, f"{section}: {missing} not in ray_config.yaml"


def test_every_setting_has_a_comment_above_it():
    """Under `args`, each key is preceded by a comment line (sections are exempt: their keys are commented)."""
    lines = CONFIG.read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "args:")
    end = next(i for i, l in enumerate(lines) if l.strip() == "deployments:")
    for i in range(start + 1, end):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue
        assert lines[i - 1].strip().startswith("#"), f"ray_config.yaml line {i + 1} has no comment: {stripped}"


def test_unknown_key_fails_with_its_path(tmp_path):
    doc = yaml.safe_load(CONFIG.read_text())
    doc["applications"][0]["args"]["cf"]["factor"] = 8  # typo of `factors`
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"applications\[0\]\.args\.cf\.factor"):
        load_settings(bad)


def test_wrong_type_fails_with_its_path():
    with pytest.raises(ConfigError, match=r"args\.serving\.mmr_lambda"):
        settings_from_args({"serving": {"mmr_lambda": 3}})


def test_missing_app_and_missing_file_are_clear(tmp_path):
    other = tmp_path / "c.yaml"
    other.write_text("applications: [{name: other, import_path: x:y}]\n")
    with pytest.raises(ConfigError, match="no application named 'echotune'"):
        load_settings(other)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_paths_are_absolute_so_submitted_jobs_find_them():
    settings = settings_from_args({"paths": {"state_dir": "~/x"}})
    assert settings.paths.state_dir.is_absolute()
    assert settings.paths.events_dir == settings.paths.state_dir / "events"


def test_default_paths_are_expanded_too():
    assert "~" not in str(Settings().paths.cache_dir) and Settings().paths.cache_dir.is_absolute()

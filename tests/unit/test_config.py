"""Settings: defaults, YAML + environment, and readable validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyfleet.config import ConfigError, load_settings


def test_defaults() -> None:
    s = load_settings()
    assert s.local.replicas == 2 and s.local.threads == 2 and s.local.slots == 2
    assert s.local.model_name == "smollm2-135m-instruct"
    assert s.database_url_value.startswith("sqlite+aiosqlite:///")
    assert s.max_body_bytes == 4 * 1024 * 1024
    assert s.local.ctx_per_slot == 2048


def test_yaml_and_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "skyfleet.yaml"
    cfg.write_text(
        "port: 9001\nlocal:\n  replicas: 3\nstatic_replicas:\n"
        "  - {url: 'http://gpu-1:8000/', model: llama-3.1-8b, engine: vllm, api_key: s3cret}\n"
    )
    monkeypatch.setenv("SKYFLEET_PORT", "9002")
    s = load_settings(cfg)
    assert s.port == 9002  # environment beats the file
    assert s.local.replicas == 3
    assert s.static_replicas[0].url == "http://gpu-1:8000"
    assert "s3cret" not in repr(s)  # secrets never show in reprs


def test_frozen() -> None:
    s = load_settings()
    with pytest.raises(Exception, match="frozen"):
        s.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"SKYFLEET_PORT": "70000"}, "port"),
        ({"SKYFLEET_LOCAL__REPLICAS": "-1"}, "local.replicas"),
        ({"SKYFLEET_LOCAL__THREADS": "many"}, "local.threads"),
        ({"SKYFLEET_MAX_BODY_BYTES": "10"}, "max_body_bytes"),
        ({"SKYFLEET_LOG_LEVEL": "loud"}, "log_level"),
        ({"SKYFLEET_NOT_A_SETTING": "1"}, "not_a_setting"),
    ],
)
def test_invalid_values_name_the_field(env: dict[str, str], field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert field in str(info.value)


def test_bad_static_replica_url(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("static_replicas:\n  - {url: 'gpu-1:8000', model: m}\n")
    with pytest.raises(ConfigError, match=r"static_replicas\.0\.url"):
        load_settings(cfg)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")

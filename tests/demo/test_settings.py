"""demo/settings.py: every knob from the environment, refused plainly when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gradio")

from demo import settings  # noqa: E402


def test_settings_from_environment():
    s = settings.Settings.from_env({"GRACE_CACHE_BYTES": "2GiB", "GRACE_AUTH": "ann:secret,bob:pw",
                                    "SPACE_ID": "someone/grace", "GRACE_FAMILIES": '{"mine": {"a": "/m/a"}}',
                                    "GRACE_ALLOW_LOCAL": "/data/one:/data/two", "GRACE_TRAIN": "0"})
    assert s.cache_bytes == 2 * 2**30
    assert s.auth == [("ann", "secret"), ("bob", "pw")]
    assert s.host == "0.0.0.0" and s.port == 7860 and not s.share and not s.train
    assert s.families == {"mine": {"a": "/m/a"}}
    assert s.allow_local == [Path("/data/one"), Path("/data/two")]
    assert settings.Settings.from_env({}).host == "127.0.0.1"


@pytest.mark.parametrize("env", [{"GRACE_CACHE_BYTES": "lots"}, {"GRACE_AUTH": "nopassword"},
                                 {"GRACE_FAMILIES": "{not json"}, {"GRACE_FAMILIES": '{"x": 3}'},
                                 {"GRACE_HUB": "maybe"}, {"GRACE_PORT": "-1"}, {"GRACE_TRAIN": "sometimes"},
                                 {"GRACE_MAX_FILE_SIZE": "huge"}, {"GRACE_RUNS_MAX_AGE_DAYS": "-3"}])
def test_bad_settings_are_reported(env):
    with pytest.raises(settings.SettingsError):
        settings.Settings.from_env(env)


def test_family_option_and_sizes():
    assert settings.parse_family_option("mine=fp:/x/bf16,q4:/x/w4-awq") == ("mine", {"fp": "/x/bf16", "q4": "/x/w4-awq"})
    with pytest.raises(settings.SettingsError):
        settings.parse_family_option("mine")
    assert settings.parse_bytes("6e9") == 6_000_000_000 and settings.parse_bytes("500MB") == 500_000_000


def test_training_control_modes():
    """Without GRACE_AUTH a public Space only shows runs; GRACE_TRAIN switches start/stop and the tab apart."""
    public = settings.Settings.from_env({"SPACE_ID": "someone/grace"})
    assert public.train and not public.train_control and public.train_mode == "view"
    with_login = settings.Settings.from_env({"SPACE_ID": "someone/grace", "GRACE_AUTH": "ann:pw"})
    assert with_login.train_control
    assert settings.Settings.from_env({}).train_control
    assert settings.Settings.from_env({"GRACE_TRAIN": "view"}).train_mode == "view"
    forced = settings.Settings.from_env({"SPACE_ID": "x/y", "GRACE_TRAIN": "1"})
    assert forced.train_control
    assert not settings.Settings.from_env({"GRACE_TRAIN": "0"}).train


def test_sizes_and_budgets():
    s = settings.Settings.from_env({"GRACE_MAX_FILE_SIZE": "2MB", "GRACE_RUNS_MAX_BYTES": "1GiB",
                                    "GRACE_UPLOADS_MAX_AGE_HOURS": "2"})
    assert s.max_file_bytes == 2_000_000 and s.runs_max_bytes == 2**30 and s.uploads_max_age_hours == 2.0
    assert settings.Settings.from_env({"SPACES_ZERO_GPU": "true"}).preload
    assert not settings.Settings.from_env({}).preload


def test_the_settings_table_lists_every_variable_read():
    """The README's table is generated from ENVIRONMENT: every GRACE_* name from_env reads is in it."""
    import inspect
    import re

    read = set(re.findall(r'"(GRACE_[A-Z_]+)"', inspect.getsource(settings.Settings.from_env)))
    assert read == set(settings.ENVIRONMENT)
    table = settings.settings_table()
    assert all(f"`{name}`" in table for name in read)


def test_wrong_logins_are_slowed_down_and_right_ones_pass():
    import asyncio
    import inspect

    from demo.auth import SlowedLogin

    login = SlowedLogin([("ann", "s3cret")])
    assert inspect.iscoroutinefunction(login.check)      # gradio awaits only coroutine functions
    assert login.delay("ann") == 0
    assert asyncio.run(login.check("ann", "wrong")) is False
    assert asyncio.run(login.check("nobody", "x")) is False
    assert login.delay("ann") == 0.5
    login.failures["ann"] = (10, login.failures["ann"][1])
    assert login.delay("ann") == 8.0                     # capped
    login.failures.clear()
    assert asyncio.run(login.check("ann", "s3cret")) is True

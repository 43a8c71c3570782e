from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from radlens.config import DEFAULT_YAML, Settings, load_settings
from radlens.errors import ConfigError
from tests.helpers import radlens_cli


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("RADLENS_"):
            monkeypatch.delenv(key)


def test_default_yaml_documents_exactly_the_built_in_defaults():
    documented = yaml.safe_load(DEFAULT_YAML.read_text())
    assert documented == Settings().model_dump(mode="json")


def test_yaml_file_then_environment_with_nesting(tmp_path, monkeypatch):
    config = tmp_path / "radlens.yaml"
    config.write_text("dicom:\n  port: 4000\n  ae_title: HOSPITAL_AI\n"
                      "destinations:\n"
                      "  - {name: pacs, ae_title: PACS, host: 10.0.0.5, port: 104}\n")
    settings = load_settings(config)
    assert (settings.dicom.port, settings.dicom.ae_title) == (4000, "HOSPITAL_AI")
    assert settings.destination("pacs").port == 104
    monkeypatch.setenv("RADLENS_DICOM__PORT", "11113")
    monkeypatch.setenv("RADLENS_DICOM__ALLOWED_CALLING_AETS", '["CT01", "US02"]')
    settings = load_settings(config)
    assert settings.dicom.port == 11113  # environment beats the file
    assert settings.dicom.ae_title == "HOSPITAL_AI"  # the rest of the file still applies
    assert settings.dicom.allowed_calling_aets == ["CT01", "US02"]


@pytest.mark.parametrize("content,message", [
    ("dicom:\n  port: 70000\n", "dicom.port: Input should be less than or equal to 65535"),
    ("dicom:\n  ae_title: WAY_TOO_LONG_AE_TITLE\n", "dicom.ae_title: Value error, an AE title has"),
    ("dicom:\n  allowed_calling_aets: ['OK', 'BAD\\\\AE']\n", "dicom.allowed_calling_aets.1"),
    ("dicomm:\n  port: 1\n", "dicomm: unknown key"),
    ("assembly:\n  quiet_period_s: 30\n  max_wait_s: 10\n", "must be at least quiet_period_s"),
    ("destinations:\n  - {name: a, ae_title: A, host: h, port: 1}\n"
     "  - {name: a, ae_title: B, host: h, port: 2}\n", "destination names must be unique"),
    ("log:\n  level: LOUD\n", "log.level"),
    ("- just\n- a list\n", "must hold a mapping"),
])
def test_invalid_values_name_the_field(tmp_path, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=None) as error:
        load_settings(config)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml")


def test_unknown_destination_lists_the_known_ones():
    settings = Settings(destinations=[{"name": "pacs", "ae_title": "P", "host": "h", "port": 1}])
    with pytest.raises(ConfigError, match=r"unknown destination 'x' \(known: pacs\)"):
        settings.destination("x")


def test_cli_invalid_config_exits_2_with_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("dicom:\n  port: -1\n")
    for command in (["config", "show"], ["serve"], ["status"]):
        result = radlens_cli(*command, "--config", str(config))
        assert result.returncode == 2, command
        lines = result.stderr.strip().splitlines()
        assert lines == ["radlens: config error: dicom.port: Input should be greater than or "
                         "equal to 1 (got -1)"]


def test_cli_config_show_prints_effective_yaml(tmp_path):
    result = radlens_cli("config", "show", env={"RADLENS_DICOM__PORT": "11999",
                                                "RADLENS_LOG__FORMAT": "json"})
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["dicom"]["port"] == 11999
    assert shown["log"]["format"] == "json"
    assert shown["storage"]["data_dir"] == str(Path("radlens-data"))


def test_cohort_schedule_must_be_a_crontab(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("cohort:\n  schedule: 'every night'\n")
    with pytest.raises(ConfigError, match="is not a crontab"):
        load_settings(config)
    config.write_text("cohort:\n  schedule: '0 2 * * *'\n")
    assert load_settings(config).cohort.schedule == "0 2 * * *"


def test_a_configured_schedule_registers_the_cohort_job(tmp_path):
    from radlens.agent.service import Agent
    from tests.helpers import free_port

    settings = Settings(storage={"data_dir": tmp_path / "data"},
                        dicom={"port": free_port(), "host": "127.0.0.1"},
                        model={"enabled": False}, cohort={"schedule": "0 2 * * *"})
    agent = Agent(settings)
    agent.start()
    try:
        job = agent.scheduler.get_job("cohort")
        assert job is not None and job.next_run_time.hour == 2
    finally:
        agent.stop()


def test_worker_processes_follow_the_machine_unless_set(monkeypatch):
    """concurrency 0: one worker process per two cores and per 4 GB, from 1 to 4; a set value
    is kept; the default memory limit shares half the machine's memory among them."""
    from radlens.config import settings as settings_module
    from radlens.config.settings import WorkerSettings

    for cores, memory_mb, expected in ((2, 24_000, 1), (1, 24_000, 1), (8, 64_000, 4),
                                       (16, 128_000, 4), (8, 8_192, 2), (64, 2_048, 1)):
        monkeypatch.setattr(settings_module.os, "cpu_count", lambda c=cores: c)
        monkeypatch.setattr(settings_module, "_machine_memory_mb", lambda m=memory_mb: m)
        worker = WorkerSettings()
        assert worker.processes() == expected, (cores, memory_mb)
        assert worker.memory_limit_mb() == max(1024, memory_mb // 2 // expected)
        assert WorkerSettings(concurrency=3).processes() == 3


def test_delivery_rules_name_known_destinations_and_valid_patterns():
    pacs = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}
    with pytest.raises(ValueError, match="names unknown destinations: ris"):
        Settings(destinations=[pacs], delivery={"rules": [
            {"name": "r", "destinations": ["pacs", "ris"]}]})
    with pytest.raises(ValueError, match="not a regular expression"):
        Settings(destinations=[pacs], delivery={"rules": [
            {"name": "r", "study_description": "([", "destinations": ["pacs"]}]})
    with pytest.raises(ValueError, match="return_host and return_port go together"):
        Settings(dicom={"peers": [{"ae_title": "US01", "return_port": 104}]})
    settings = Settings(destinations=[pacs], dicom={"peers": [
        {"ae_title": "US 01", "return_host": "10.1.1.1", "return_port": 11112}]},
        delivery={"rules": [{"name": "r", "destinations": ["sender"]}]})
    assert [d.name for d in settings.delivery_destinations()] == ["pacs", "sender-US_01"]


def test_a_delivery_rule_matches_every_condition_it_sets():
    from radlens.agent.delivery import StudySource, plan

    pacs = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}
    ris = {"name": "ris", "ae_title": "RIS", "host": "10.0.0.6", "port": 104}
    settings = Settings(destinations=[pacs, ris], delivery={"unmatched": "none", "rules": [
        {"name": "density", "task": "density", "destinations": ["ris"]},
        {"name": "breast-us", "modality": "US", "study_description": "breast",
         "destinations": ["pacs"]}]})
    us = StudySource(frozenset({"US01"}), frozenset({"US"}), "US BREAST LEFT",
                     frozenset({"breast_us"}))
    assert [d.name for d in plan(settings, us).destinations] == ["pacs"]
    mammo = StudySource(frozenset({"MG01"}), frozenset({"MG"}), "",
                        frozenset({"mammo_density"}))
    assert [d.name for d in plan(settings, mammo).destinations] == ["ris"]
    other = StudySource(frozenset({"US01"}), frozenset({"US"}), "thyroid", frozenset())
    chosen = plan(settings, other)
    assert chosen.destinations == [] and "unmatched: none" in chosen.reason
    nowhere = plan(Settings(), other)
    assert nowhere.destinations == [] and nowhere.reason == "no destinations are configured"
    assert StudySource.tasks_of({"images": [{"predictions": [{}]}, {"density": None}]}) == {
        "breast_us"}

"""Config loading, overrides and the guards of validate-config (no data, no teacher needed)."""

import pytest

from kd_core import guards
from kd_core.config import ConfigOverrides, load_config, parse_overrides
from kd_core.errors import ConfigError

BASE = ["teacher.model=some/teacher", "output.uri=/tmp/x"]


def test_every_profile_loads_and_passes_the_guard():
    from kd_core.config import available_profiles

    names = available_profiles()
    assert {"demo", "testing", "development", "small", "medium", "large"} <= set(names)
    expected_samples = {"testing": 1_000, "development": 10_000, "small": 100_000, "medium": 1_000_000, "large": 10_000_000}
    for name in names:
        config = load_config(name)
        guards.check_config(config)
        if name in expected_samples:
            assert config.dataset.max_samples == expected_samples[name]


def test_overrides_parse_yaml_values_and_null_unsets():
    assert parse_overrides(["cache.top_k=32", "dataset.streaming=true", "output.max_bytes=null", "dataset.split=train[:10]"]) == {
        "cache": {"top_k": 32}, "dataset": {"streaming": True, "split": "train[:10]"}, "output": {"max_bytes": None}}
    config = load_config("testing", ["output.max_bytes=null", "cache.top_k=8"])
    assert config.output.max_bytes is None and config.cache.top_k == 8


def test_seed_alias_sets_max_samples():
    assert load_config("testing", ["distillation.dataset.max_samples=77"]).dataset.max_samples == 77
    assert load_config("testing", {"distillation": {"dataset": {"max_samples": 78}}}).dataset.max_samples == 78


def test_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"dataset\.max_sample: unknown key\. Did you mean dataset\.max_samples\?"):
        load_config("testing", ["dataset.max_sample=10"])
    with pytest.raises(ConfigError, match="teachr: unknown key. Did you mean teacher"):
        load_config("testing", ["teachr.model=x"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"cache\.top_k: .*integer.*'many'"):
        load_config("testing", ["cache.top_k=many"])


def test_bad_profile_yaml_and_missing_profile(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="no profile named 'nope'.*demo"):
        load_config("nope")


def test_streaming_without_max_samples_is_refused_with_an_actionable_message():
    config = load_config("testing", ["dataset.max_samples=null"])
    assert config.dataset.streaming and config.dataset.max_samples is None
    with pytest.raises(ConfigError) as e:
        guards.check_config(config)
    message = str(e.value)
    assert "dataset.max_samples is required when dataset.streaming=true" in message
    assert "FineWeb" in message and "billions" in message
    assert "dataset.max_samples=1000000" in message  # the fix, as an override
    assert "10,000" in message and "1,000,000" in message  # recommended values per use case


def test_non_streaming_without_max_samples_is_allowed():
    guards.check_config(load_config("testing", ["dataset.max_samples=null", "dataset.streaming=false"]))


@pytest.mark.parametrize("override, key", [
    ("dataset.max_samples=0", "dataset.max_samples"),
    ("dataset.max_samples=-5", "dataset.max_samples"),
    ("cache.top_k=0", "cache.top_k"),
    ("cache.max_length=1", "cache.max_length"),
    ("run.num_shards=0", "run.num_shards"),
    ("run.num_shards=1001", "run.num_shards"),
    ("output.max_bytes=0", "output.max_bytes"),
])
def test_out_of_range_values_are_refused(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*Fix"):
        guards.check_config(load_config("testing", [override]))


def test_top_k_larger_than_vocab_is_refused():
    config = load_config("testing", ["cache.top_k=5000"])
    with pytest.raises(ConfigError, match=r"cache\.top_k \(5000\) is larger than the teacher's vocabulary \(1000"):
        guards.check_vocab(config, 1000)
    guards.check_vocab(config, 5000)


def test_overrides_model_mirrors_config_and_refuses_unknown_keys():
    schema = ConfigOverrides.model_json_schema()
    dataset = schema["$defs"]["DatasetOverrides"]["properties"]
    assert "required when streaming" in dataset["max_samples"]["description"]
    with pytest.raises(Exception):
        ConfigOverrides.model_validate({"dataset": {"nope": 1}})


def test_secrets_are_masked_and_do_not_change_the_content_key():
    a = load_config("testing", {"output": {"storage_options": {"key": "AKIA123", "secret": "s3cr3t", "endpoint_url": "http://x"}}})
    b = load_config("testing")
    public = a.public_dict()["output"]["storage_options"]
    assert public == {"key": "***", "secret": "***", "endpoint_url": "http://x"}
    assert "s3cr3t" not in str(a.public_dict())
    assert a.content_key() == b.content_key()
    assert load_config("testing", ["cache.top_k=8"]).content_key() != b.content_key()

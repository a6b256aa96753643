"""Config loading, overrides and the guards of validate-config (no data, no teacher needed)."""

import os

import pytest

from kd_core import guards
from kd_core.build import version_key
from kd_core.config import load_config, override_strings, parse_overrides
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


def test_every_key_works_under_the_seed_prefix():
    config = load_config("testing", ["distillation.dataset.max_samples=77", "distillation.dataset.streaming=false",
                                     "distillation.cache.top_k=16", "distillation.output.max_bytes=null"])
    assert (config.dataset.max_samples, config.dataset.streaming, config.cache.top_k) == (77, False, 16)
    assert config.output.max_bytes is None
    assert load_config("testing", {"distillation": {"dataset": {"max_samples": 78}}}).dataset.max_samples == 78
    with pytest.raises(ConfigError, match=r"dataset\.max_sample: unknown key\. Did you mean dataset\.max_samples\?"):
        load_config("testing", ["distillation.dataset.max_sample=10"])


def test_seed_streaming_command_reaches_the_guard():
    """The seed's own FineWeb example: streaming on, no max_samples -> the guard, with the fix in every form."""
    config = load_config("medium", ["distillation.dataset.streaming=true", "distillation.dataset.max_samples=null"])
    with pytest.raises(ConfigError) as e:
        guards.check_config(config)
    message = str(e.value)
    assert message.startswith("dataset.max_samples is required when dataset.streaming=true")
    assert "distillation.dataset.max_samples=1000000" in message  # the form the seed's user typed
    assert '"overrides": ["dataset.max_samples=1000000"]' in message  # REST
    assert "Overrides field" in message  # the UI


@pytest.mark.parametrize("override, message", [
    ("cache.top_k=yes", r"cache\.top_k: .*integer.*'yes'"),  # YAML 1.1 would make this True, then 1
    ("dataset.max_samples=true", r"dataset\.max_samples: .*integer.*True"),  # a bool is not a number
    ("dataset.streaming=1", r"dataset\.streaming: .*boolean.*1"),  # a number is not a bool
    ("cache.top_k=1.0", r"cache\.top_k: .*integer"),
])
def test_values_are_strict_yaml_1_2_scalars(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("testing", [override])


def test_leading_zero_is_decimal_and_yes_is_a_string():
    assert load_config("testing", ["cache.top_k=010"]).cache.top_k == 10  # YAML 1.1 read this as octal 8
    assert parse_overrides(["dataset.config=yes", "dataset.split=on"]) == {"dataset": {"config": "yes", "split": "on"}}


def test_profile_files_are_yaml_1_2_too(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("teacher: {model: t}\ndataset: {name: d, max_samples: 010, config: no}\noutput: {uri: /tmp/o}\n")
    config = load_config(str(profile))
    assert config.dataset.max_samples == 10 and config.dataset.config == "no"


CREDENTIAL_OVERRIDES = [
    ("output.storage_options.secret=hunter2-Zq9pw0rd", "output.storage_options.secret"),
    ("output.storage_options.key=AKIA-Zq9pw0rd", "output.storage_options.key"),
    ("output.storage_options={key: AKIA-Zq9pw0rd, endpoint_url: 'http://x'}", "output.storage_options.key"),
    ("output.storage_options.client_kwargs.aws_secret_access_key=Zq9pw0rd", "aws_secret_access_key"),
    ("output.storage_options.connection_string=Zq9pw0rd", "output.storage_options.connection_string"),
    ("output.storage_options.token=Zq9pw0rd", "output.storage_options.token"),
    ("output.uri=s3://user:Zq9pw0rd@host/bucket", "output.uri"),
    ("distillation.dataset.data_files=https://bob:Zq9pw0rd@example.com/a.parquet", "dataset.data_files"),
    # A password with a '/' in it (unescaped): the userinfo pattern once stopped at the '/'.
    ("output.uri=s3://user:Zq9/pw0rd@bucket/x", "output.uri"),
    ("dataset.data_files=[s3://user:Zq9/pw0rd@bucket/a.parquet]", "dataset.data_files"),
    ("output.storage_options.secretAccessKey=Zq9pw0rd", "output.storage_options.secretAccessKey"),
]


@pytest.mark.parametrize("override, key", CREDENTIAL_OVERRIDES)
def test_credentials_in_overrides_are_refused_without_echoing_them(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("testing", [override])
    message = str(e.value)
    assert key in message and "Zq9pw0rd" not in message
    assert "environment" in message and "Prefect Secret" in message


def test_malformed_override_never_echoes_its_value():
    for bad in ["AKIA-Zq9pw0rd-NO-EQUALS", "=Zq9pw0rd", "output uri with spaces=Zq9pw0rd", "a..b=Zq9pw0rd"]:
        with pytest.raises(ConfigError, match="KEY=VALUE") as e:
            parse_overrides([bad])
        assert "Zq9pw0rd" not in str(e.value)
    with pytest.raises(ConfigError, match="KEY=VALUE string"):
        parse_overrides([{"dataset": 1}])


def test_null_or_empty_overrides_mean_the_profile_as_is():
    assert load_config("testing", None) == load_config("testing", []) == load_config("testing")


def test_override_strings_round_trip():
    nested = {"cache": {"top_k": 8}, "dataset": {"split": "train[:10]", "max_samples": None, "data_files": ["a", "b"]},
              "output": {"uri": "s3://b/p", "storage_options": {"endpoint_url": "http://127.0.0.1:9"}}}
    assert parse_overrides(override_strings(nested)) == nested


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


def test_sampled_mode_checks_samples_and_ignores_top_k():
    for samples in (0, 40000):
        with pytest.raises(ConfigError, match=r"cache\.samples must be between 1 and 32767.*Fix: e\.g\. cache\.samples=64"):
            guards.check_config(load_config("testing", ["cache.mode=sampled", f"cache.samples={samples}"]))
    with pytest.raises(ConfigError, match=r"cache\.mode: .*'topk' or 'sampled'"):
        load_config("testing", ["cache.mode=top-k"])
    sampled = load_config("testing", ["cache.mode=sampled", "cache.top_k=0", "cache.samples=16"])
    guards.check_config(sampled)  # top_k plays no part in sampled mode
    guards.check_vocab(load_config("testing", ["cache.mode=sampled", "cache.top_k=5000"]), 1000)


SOURCE = "0" * 64  # one resolved source (ResolvedSource.digest()) for the config-only comparisons below


def test_content_key_covers_only_the_mode_s_own_settings():
    topk = version_key(load_config("testing"), SOURCE)
    assert version_key(load_config("testing", ["cache.samples=7"]), SOURCE) == topk  # samples: no byte of a top-k cache
    sampled = version_key(load_config("testing", ["cache.mode=sampled", "cache.samples=64"]), SOURCE)
    assert sampled != topk
    assert version_key(load_config("testing", ["cache.mode=sampled", "cache.top_k=3"]), SOURCE) == sampled
    assert version_key(load_config("testing", ["cache.mode=sampled", "cache.samples=16"]), SOURCE) != sampled


def test_storage_options_are_masked_by_allow_list_and_do_not_change_the_content_key():
    """Masking by secret names once missed connection_string and passwords inside URLs."""
    options = {"endpoint_url": "http://x", "client_kwargs": {"region_name": "eu"}, "fixed_upload_size": True,
               "s3_additional_kwargs": {"ACL": "private"}}
    a = load_config("testing", {"output": {"storage_options": options}})
    b = load_config("testing")
    public = a.public_dict()["output"]["storage_options"]
    assert public == {"endpoint_url": "http://x", "client_kwargs": {"region_name": "eu"}, "fixed_upload_size": "***",
                      "s3_additional_kwargs": "***"}
    assert version_key(a, SOURCE) == version_key(b, SOURCE)
    for secret in ({"key": "AKIA123"}, {"connection_string": "AccountKey=s3cr3t"},
                   {"client_kwargs": {"aws_session_token": "s3cr3t"}}, {"endpoint_url": "https://u:s3cr3t@host"}):
        with pytest.raises(ConfigError, match="credentials are not accepted in the config") as e:
            load_config("testing", {"output": {"storage_options": secret}})
        assert "s3cr3t" not in str(e.value) and "AKIA123" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^dataset\.data_files: credentials are not accepted in the config") as e:
        load_config("testing", {"dataset": {"data_files": "https://u:s3cr3t@host/x.parquet"}})
    assert "s3cr3t" not in str(e.value)
    assert version_key(load_config("testing", ["cache.top_k=8"]), SOURCE) != version_key(b, SOURCE)


def test_kd_core_does_not_import_prefect():
    import subprocess
    import sys

    code = ("import pkgutil, importlib, sys, kd_core\n"
            "for m in pkgutil.iter_modules(kd_core.__path__): importlib.import_module(f'kd_core.{m.name}')\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'prefect'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_demo_paths_resolve_once_when_the_build_is_checked(monkeypatch):
    """load_config leaves `@demo/NAME` as written (config.py needs no demo); kd_core.build.check resolves it."""
    from kd_core.demo import resolve_demo_paths

    monkeypatch.setattr("kd_core.demo.resolve_path", lambda value: "/assets/" + value.removeprefix("@demo/"))
    assert load_config("demo").teacher.model == "@demo/teacher"
    config = resolve_demo_paths(load_config("demo"))
    assert (config.teacher.model, config.dataset.data_files) == ("/assets/teacher", "/assets/corpus.parquet")
    assert resolve_demo_paths(load_config("demo", ["dataset.data_files=[a.parquet, '@demo/corpus.parquet']"])
                              ).dataset.data_files == ["a.parquet", "/assets/corpus.parquet"]


def _policy_config(tmp_path, **sections):
    base = {"teacher": {"model": "org/model"}, "dataset": {"name": "parquet", "data_files": "@demo/corpus.parquet"},
            "output": {"uri": str(tmp_path / "out")}}
    for section, values in sections.items():
        base[section] = {**base[section], **values}
    return load_config("demo", base)


def test_deployment_policy_decides_what_a_run_may_read_and_run(tmp_path):
    """A run's config is a run parameter: once, anyone who could trigger a run could read /etc/passwd into a cache
    or run code with teacher.trust_remote_code=true. Now the worker's environment decides (DEPLOYMENT.md)."""
    data = tmp_path / "data"
    (data / "in").mkdir(parents=True)
    (data / "escape").symlink_to("/etc")
    roots = {guards.ALLOWED_ROOTS_ENV: f"{data}{os.pathsep}/models"}
    passwd = _policy_config(tmp_path, dataset={"name": "text", "data_files": "/etc/passwd"})
    outside = r"dataset\.data_files: '/etc/passwd' is a local path outside the directories this worker lets runs read"

    guards.check_policy(passwd, deployed=False, env={})  # the command line: the user's own files
    with pytest.raises(ConfigError, match=outside + r" \(none: KD_CACHE_ALLOWED_ROOTS is not set\)"):
        guards.check_policy(passwd, deployed=True, env={})
    with pytest.raises(ConfigError, match=outside):
        guards.check_policy(passwd, deployed=False, env=roots)
    guards.check_policy(_policy_config(tmp_path), deployed=True, env={})  # hub ids and the demo's own assets
    for inside in (f"{data}/in/a.parquet", [f"{data}/in/a.parquet"], {"train": f"file://{data}/in/*.parquet"}):
        guards.check_policy(_policy_config(tmp_path, dataset={"data_files": inside}), deployed=True, env=roots)
    for escape in (f"{data}/escape/passwd", f"{data}/in/../../x.parquet"):
        with pytest.raises(ConfigError, match="dataset.data_files: .* outside"):
            guards.check_policy(_policy_config(tmp_path, dataset={"data_files": escape}), deployed=True, env=roots)
    with pytest.raises(ConfigError, match="teacher.model: '/opt/m' is a local path outside"):
        guards.check_policy(_policy_config(tmp_path, teacher={"model": "/opt/m"}), deployed=True, env=roots)
    with pytest.raises(ConfigError, match="dataset.name: '/srv/ds' is a local path outside"):
        guards.check_policy(_policy_config(tmp_path, dataset={"name": "/srv/ds"}), deployed=True, env=roots)

    guards.check_profile("testing", deployed=True, env={})  # a shipped profile, by name
    (tmp_path / "elsewhere").mkdir()
    for where in (data / "in", tmp_path / "elsewhere"):
        (where / "p.yaml").write_text("teacher: {model: org/model}\n")
    guards.check_profile(str(data / "in" / "p.yaml"), deployed=True, env=roots)
    with pytest.raises(ConfigError, match=r"profile: '.*elsewhere/p\.yaml' is a local path outside"):
        guards.check_profile(str(tmp_path / "elsewhere" / "p.yaml"), deployed=True, env=roots)

    code = _policy_config(tmp_path, teacher={"trust_remote_code": True})
    refused = r"teacher\.trust_remote_code: this worker does not let runs execute code .* KD_CACHE_ALLOW_REMOTE_CODE=1"
    with pytest.raises(ConfigError, match=refused):
        guards.check_policy(code, deployed=True, env={})
    with pytest.raises(ConfigError, match=refused):
        guards.check_policy(code, deployed=False, env={guards.ALLOW_REMOTE_CODE_ENV: "0"})
    guards.check_policy(code, deployed=True, env={guards.ALLOW_REMOTE_CODE_ENV: "1"})
    guards.check_policy(code, deployed=False, env={})


def test_the_flows_parameter_schema_refuses_credentials_before_a_run_is_stored():
    """A REST or UI run is checked by Prefect's server against the flow's parameter schema before it is stored
    (409 otherwise): the same validator, on the same schema, refuses every credential override the CLI refuses."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from flows.build_teacher_cache import build_teacher_cache

    schema = parameter_schema(build_teacher_cache.fn).model_dump_for_openapi()

    def accepted(override: str) -> bool:
        try:
            validate({"profile": None, "overrides": [override]}, schema, raise_on_error=True)
        except ValidationError:
            return False
        return True

    for override, _ in CREDENTIAL_OVERRIDES:
        assert not accepted(override), override
        assert not accepted(" " + override.replace("=", " = ", 1)), override  # any spacing
    assert not accepted("output.storage_options={Endpoint_URL: 'http://x', AWS_Secret_Access_Key: Zq9pw0rd}")
    for fine in ["dataset.max_samples=1000", "output.uri=s3://bucket/kd/run1", "output.storage_options.anon=false",
                 "output.storage_options.endpoint_url=http://127.0.0.1:9000", "output.credentials=kd-cache-s3",
                 "output.storage_options={endpoint_url: 'http://monkey.local:9000', region_name: eu-west-1}",
                 "dataset.data_files=https://example.com/a.parquet", "teacher.model=Qwen/Qwen2.5-0.5B"]:
        assert accepted(fine), fine


def test_a_password_with_a_slash_is_never_echoed():
    """`s3://user:pa/ss@bucket`: refused from a profile too, and stripped wherever a URL is recorded or shown."""
    from kd_core.config import strip_url_credentials

    with pytest.raises(ConfigError, match="output.uri: credentials") as e:
        load_config("testing", {"output": {"uri": "s3://user:Zq9/pw0rd@bucket/x"}})
    assert "Zq9" not in str(e.value) and "pw0rd" not in str(e.value)
    assert strip_url_credentials("s3://user:Zq9/pw0rd@bucket/x") == "s3://***@bucket/x"
    assert strip_url_credentials("see s3://u:p@ss/w@b/k and s3://c@d/e") == "see s3://***@b/k and s3://***@d/e"
    assert strip_url_credentials("s3://bucket/key@v2.parquet") == "s3://bucket/key@v2.parquet"  # no userinfo


@pytest.mark.parametrize("data_files", [["s3://u:Zq9/pw0rd@b/x.parquet", 5], [{"token": "Zq9pw0rd"}],
                                        [["Zq9pw0rd"]], 7])
def test_a_bad_data_files_list_never_echoes_its_items(data_files):
    with pytest.raises(ConfigError, match=r"dataset\.data_files") as e:
        load_config("testing", {"dataset": {"data_files": data_files}})
    assert "Zq9" not in str(e.value) and "pw0rd" not in str(e.value), str(e.value)


@pytest.mark.parametrize("value", ["wJalrXUtnFEMI/K7MDENG+Zq9pw0rd", "AKIAZQ9PW0RD", '{"key": "Zq9pw0rd"}'])
def test_output_credentials_holds_a_block_name_never_a_secret(value):
    """A secret pasted where the Secret block's name goes is refused without being echoed (the name is recorded
    and quoted in messages; Prefect block names are lowercase letters, digits and dashes)."""
    with pytest.raises(ConfigError, match=r"output\.credentials: ") as e:
        load_config("testing", [f"output.credentials={value}"])
    assert "Zq9" not in str(e.value) and "pw0rd" not in str(e.value) and "AKIA" not in str(e.value)
    assert load_config("testing", ["output.credentials=kd-s3-prod"]).output.credentials == "kd-s3-prod"


@pytest.mark.parametrize("key, right", [("endpointUrl", "endpoint_url"), ("regionName", "region_name"),
                                        ("client_kwargs.endpointURL", "client_kwargs.endpoint_url")])
def test_camel_case_storage_options_name_the_key_and_its_spelling(key, right):
    """fsspec passes an unknown option on to the client, which ignores it: `endpointUrl` sent requests to AWS and
    read as "bucket does not exist"."""
    with pytest.raises(ConfigError) as e:
        load_config("testing", [f"output.storage_options.{key}=http://127.0.0.1:9"])
    assert str(e.value).startswith(f"output.storage_options.{key}: ") and f"output.storage_options.{right}" in str(e.value)
    assert "127.0.0.1" not in str(e.value)
    # Options that are not fsspec's own keep their spelling (headers, S3 request arguments).
    load_config("testing", {"output": {"storage_options": {"s3_additional_kwargs": {"ACL": "private"}}}})


def test_a_loaded_config_cannot_be_changed_in_place():
    """A Build carries its config to every step and to deployed shards under a key computed once: a step that set
    a field in place would make rows the key does not describe. Changes go through model_copy (a new value)."""
    from pydantic import ValidationError

    config = load_config("testing", BASE)
    with pytest.raises(ValidationError, match="frozen"):
        config.cache.top_k = 3
    with pytest.raises(ValidationError, match="frozen"):
        config.teacher = config.teacher
    assert config.cache.model_copy(update={"top_k": 3}).top_k == 3 and config.cache.top_k != 3

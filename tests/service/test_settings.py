"""Settings from RLAIFV_* environment variables."""

from __future__ import annotations

import os

import pytest
import torch
from pydantic import ValidationError

from rlaifv.service.settings import Settings


def test_env_vars_are_read(monkeypatch, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\nsk-file-key-123456\n")
    monkeypatch.setenv("RLAIFV_BUNDLE", str(tmp_path))
    monkeypatch.setenv("RLAIFV_MAX_N", "5")
    monkeypatch.setenv("RLAIFV_ALLOWED_IMAGE_HOSTS", "a.example.com, *.b.org")
    monkeypatch.setenv("RLAIFV_ALLOWED_IMAGE_FORMATS", '["png", "jpeg"]')
    monkeypatch.setenv("RLAIFV_API_KEYS", "sk-env-key-123456")
    monkeypatch.setenv("RLAIFV_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("RLAIFV_BATCH_WINDOW_MS", "2.5")
    s = Settings()
    assert s.bundle == tmp_path and s.max_n == 5 and s.batch_window_ms == 2.5
    assert s.allowed_image_hosts == ["a.example.com", "*.b.org"]
    assert s.allowed_image_formats == ["PNG", "JPEG"]
    assert s.load_api_keys() == ["sk-env-key-123456", "sk-file-key-123456"]
    assert len(s.api_key_hashes()) == 2


@pytest.mark.parametrize("content", ["", "\n\n", "# keys go here\n"])
def test_a_keys_file_without_a_key_is_refused_not_an_open_api(tmp_path, content: str) -> None:
    """A Secret created without its key mounts an empty file: the service ran with /v1 open to anyone."""
    keys = tmp_path / "keys"
    keys.write_text(content)
    with pytest.raises(ValueError, match="holds no key: with it, /v1 would be open to anyone"):
        Settings(api_keys_file=keys)


def test_flags_override_env(monkeypatch) -> None:
    from rlaifv.service.serve_cli import build_settings

    monkeypatch.setenv("RLAIFV_PORT", "9000")
    monkeypatch.setenv("RLAIFV_MAX_QUEUE", "3")
    s = build_settings(port=9100, max_queue=None)
    assert s.port == 9100 and s.max_queue == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_n", 0),
        ("max_queue", 0),
        ("port", 70000),
        ("api_keys", "changeme"),
        ("api_keys", "short"),
        ("pack_weights", "sometimes"),
        ("log_level", "bogus"),
        ("redis_url", "http://x"),
        ("redis_url", "redis://:pw@127.0.0.1:abc/0"),
        ("redis_url", "redis://:pw@[::1/0"),
        ("redis_url", "unix://"),
        ("generator_url", "http://127.0.0.1:abc/v1"),
        ("generator_url", "http://127.0.0.1:99999/v1"),
        ("vllm_policy_url", "http:///v1"),
        ("dtype", "float64"),
        ("dtype", ""),
        ("device", "tpu"),
        ("allowed_image_formats", ""),
        ("allowed_image_formats", "PNG,JPG"),
        ("shutdown_grace_s", float("inf")),
        ("request_timeout_s", float("nan")),
        ("cache_ttl_s", 10**17),
        ("jobs_ttl_s", 10**20),
        ("torch_threads", 100_000),
        ("protect_metrics", True),
        ("ready_requires_redis", True),
        ("redis_tls_ca_file", "/no/such/ca.pem"),
    ],
)
def test_unsafe_or_invalid_settings_refused(field, value) -> None:
    """Each was accepted and failed later: a traceback after the model loaded, 500s on every request (a TTL Redis
    refuses), every JPEG refused ("JPG"), /metrics left open while "protected", a grace of inf crashing serve."""
    with pytest.raises(ValidationError):
        Settings(**{field: value})


def test_device_and_dtype_names_are_read_loosely() -> None:
    assert Settings(device=" CPU ").device == "cpu" and Settings(dtype="BFloat16").dtype == "bfloat16"
    assert Settings(device="auto").device is None and Settings(device="cpu:0").device == "cpu:0"
    assert Settings(allowed_image_formats="JPEG,MPO").allowed_image_formats == ["JPEG", "MPO"]  # phones' JPEGs


def test_a_url_that_does_not_parse_never_echoes_its_password() -> None:
    with pytest.raises(ValidationError, match="percent-encode") as info:
        Settings(redis_url="redis://app:Sup3r#Secret@redis:6379/0")
    assert "Sup3r" not in str(info.value)


def test_printed_settings_keep_passwords_and_keys_out() -> None:
    """repr showed the Redis password and URLs whole (the keys alone were hidden, as SecretStr)."""
    settings = Settings(
        redis_url="redis://u:pw1@redis:6379/0",
        redis_password="pw2",
        generator_url="http://a:pw3@gen:8000/v1",
        vllm_policy_url="http://b:pw4@vllm:8000/v1?key=pw5",
        generator_api_key="sk-0123456789abcdef",
        api_keys=["sk-live-0123456789", "sk-live-abcdefghij"],
    )
    shown = repr(settings)
    secrets = ("pw1", "pw2", "pw3", "pw4", "pw5", "sk-0123", "sk-live")
    assert not [secret for secret in secrets if secret in shown], shown
    assert "redis://redis:6379/0" in shown and "http://gen:8000/v1" in shown and "http://vllm:8000/v1" in shown
    assert settings.redis_options()["password"] == "pw2"  # what the client gets is unchanged
    assert "redis_url='unix://***'" in repr(Settings(redis_url="unix://x:abc/run/redis.sock"))  # was a ValueError


def test_redis_settings_that_would_be_dropped_are_refused(tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    with pytest.raises(ValidationError, match="RLAIFV_REDIS_TLS_CA_FILE without TLS"):
        Settings(redis_url="redis://127.0.0.1:6379/0", redis_tls_ca_file=ca)
    with pytest.raises(ValidationError, match="not a unix:// socket"):
        Settings(redis_url="unix:///run/redis.sock", redis_tls=True)
    assert Settings(redis_url="rediss://127.0.0.1:6379/0", redis_tls_ca_file=ca).redis_options()["ssl_ca_certs"] == str(
        ca
    )


def test_tls_over_a_redis_url_reaches_the_client() -> None:
    """`ssl=True` beside a redis:// URL made every command fail (redis-py's plain connection takes no `ssl`)."""
    from redis.asyncio.connection import SSLConnection

    from rlaifv.service.redis_conn import connect

    settings = Settings(redis_url="redis://127.0.0.1:6390/0", redis_tls=True)
    assert settings.redis_connection_url() == "rediss://127.0.0.1:6390/0"
    assert connect(settings).connection_pool.connection_class is SSLConnection


@pytest.mark.parametrize(
    ("url", "settings", "expected"),
    [
        ("redis://:wrong@h:1/0", {"redis_password": "right"}, "redis://h:1/0"),
        ("redis://bob:wrong@h:1/0", {"redis_password": "right"}, "redis://bob@h:1/0"),
        ("redis://bob:wrong@h:1/0", {"redis_username": "ann", "redis_password": "right"}, "redis://h:1/0"),
        ("redis://bob:pw@h:1/0", {}, "redis://bob:pw@h:1/0"),
        ("redis://h:1/0", {"redis_password": "right"}, "redis://h:1/0"),
        ("redis://:s3cret@h:1/0", {"redis_username": "app"}, "redis://:s3cret@h:1/0"),  # the user alone is set
        ("redis://app:s3cret@h:1/0", {"redis_username": "ops"}, "redis://:s3cret@h:1/0"),
        ("redis://app:p%40ss@h:1/0", {}, "redis://app:p%40ss@h:1/0"),
    ],
)
def test_the_password_setting_overrides_one_in_the_url(url: str, settings: dict, expected: str) -> None:
    assert Settings(redis_url=url, **settings).redis_connection_url() == expected


def test_empty_path_variables_are_unset_and_a_keys_file_may_start_with_a_bom(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RLAIFV_BUNDLE", "")
    monkeypatch.setenv("RLAIFV_API_KEYS_FILE", "")
    assert Settings().bundle is None and Settings().api_keys_file is None
    keys = tmp_path / "keys"
    keys.write_text("\ufeffsk-first-key-0123\nsk-second-key-456\n", encoding="utf-8")
    assert Settings(api_keys_file=keys).load_api_keys() == ["sk-first-key-0123", "sk-second-key-456"]


def test_placeholder_keys_allowed_only_when_asked() -> None:
    assert Settings(api_keys="changeme", allow_placeholder_keys=True).load_api_keys() == ["changeme"]


def test_generator_settings_from_env_and_flags(monkeypatch) -> None:
    from rlaifv.service.serve_cli import build_settings

    monkeypatch.setenv("RLAIFV_GENERATOR_URL", "http://vllm.internal:8000/v1/")
    monkeypatch.setenv("RLAIFV_GENERATOR_API_KEY", "sk-generator-secret")
    s = build_settings(generator_model="Qwen/Qwen2-VL-7B-Instruct", generator_max_n=4)
    assert s.generator_url == "http://vllm.internal:8000/v1"
    assert s.generator_model == "Qwen/Qwen2-VL-7B-Instruct" and s.generator_max_n == 4
    assert s.generator_api_key is not None and s.generator_api_key.get_secret_value() == "sk-generator-secret"
    assert "sk-generator-secret" not in repr(s)
    assert Settings(generator_url="").generator_url is None
    with pytest.raises(ValidationError, match="http"):
        Settings(generator_url="vllm.internal:8000/v1")


def test_pack_weights_reaches_the_served_pair(tiny_bundle) -> None:
    """RLAIFV_PACK_WEIGHTS: 'on' packs a pair's bf16 (and, on x86, float32) linears and refuses a float16 pair at
    start-up; 'auto' packs float32 where measured faster (AMD); 'off' never packs."""
    from rlaifv.reward.errors import PackingUnavailableError
    from rlaifv.reward.packed_weights import packing_supported, packs_by_default
    from rlaifv.service.engines import load_engine

    def load(**overrides):
        return load_engine(Settings(bundle=tiny_bundle, device="cpu", **overrides))[0]

    assert load(dtype="bfloat16", pack_weights="off").pair.packed == []
    with pytest.raises(PackingUnavailableError):
        load(dtype="float16", pack_weights="on")
    engine = load(dtype="float32", pack_weights="auto")
    assert bool(engine.pair.packed) == packs_by_default(torch.float32)
    engine.shutdown()
    for dtype in (torch.bfloat16, torch.float32):
        if packing_supported(dtype):
            engine = load(dtype=str(dtype).removeprefix("torch."), pack_weights="on")
            assert engine.pair.packed and all(handle.count for handle in engine.pair.packed)
            engine.shutdown()


def test_the_stall_limit_must_outlast_a_healthy_vllm_batch() -> None:
    """A vllm batch makes up to three calls in a row, each allowed RLAIFV_VLLM_TIMEOUT_S to get a connection and
    again to be answered: a liveness limit under their sum would restart replicas that are only slow."""
    urls = {"engine": "vllm", "vllm_policy_url": "http://p:1/v1", "vllm_reference_url": "http://r:1/v1"}
    with pytest.raises(ValidationError, match=r"RLAIFV_ENGINE_STALL_S \(720\) must exceed 6 x RLAIFV_VLLM_TIMEOUT_S"):
        Settings(**urls, engine_stall_s=720, vllm_timeout_s=120)
    assert Settings(**urls, engine_stall_s=721, vllm_timeout_s=120).engine_stall_s == 721
    assert Settings(**urls, engine_stall_s=0, vllm_timeout_s=120).engine_stall_s == 0  # never
    assert Settings(engine_stall_s=30).engine_stall_s == 30  # in process: no HTTP calls to wait on


def test_rlaifv_family_check_reaches_the_model_load(tmp_path, monkeypatch) -> None:
    """A bundle the load-time family check refuses (its log-probs differ: made so here) fails start-up;
    RLAIFV_FAMILY_CHECK=warn serves it. (One the engine cannot run at all, BLIP-2, is refused either way.)"""
    from rlaifv.reward import family_check
    from rlaifv.reward.bundle_create import create_bundle
    from rlaifv.reward.errors import ModelLoadError
    from rlaifv.service.engines import load_engine
    from rlaifv.service.settings import Settings
    from rlaifv.testing.tiny_unregistered import build_tiny_paligemma

    def disagrees(model, result):
        raise ModelLoadError(f"{family_check._unknown(model)} and the shared-prefix engine disagrees (made so)")

    monkeypatch.setattr(family_check, "require_exact", disagrees)
    paligemma = build_tiny_paligemma(tmp_path / "paligemma")
    create_bundle(tmp_path / "bundle", policy=paligemma, reference=paligemma)
    with pytest.raises(ModelLoadError, match="'paligemma' has no rules"):
        load_engine(Settings(bundle=tmp_path / "bundle", device="cpu"))
    monkeypatch.setenv("RLAIFV_FAMILY_CHECK", "warn")
    engine, _ = load_engine(Settings(bundle=tmp_path / "bundle", device="cpu"))
    assert engine is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "99999"], "--port / RLAIFV_PORT: Input should be less than or equal to 65535"),
        (["--max-n", "0"], "--max-n / RLAIFV_MAX_N: Input should be greater than or equal to 1"),
        (["--log-level", "bogus"], "--log-level / RLAIFV_LOG_LEVEL: must be one of critical"),
        (["--redis-url", "http://x"], "--redis-url / RLAIFV_REDIS_URL: must be a redis://"),
        (["--bundle", "{tmp}/missing"], "{tmp}/missing"),
    ],
)
def test_serve_refuses_bad_settings_naming_the_flag_before_loading(args, message, tmp_path, monkeypatch) -> None:
    """A clean exit 2 naming the flag and the variable (it was a pydantic traceback naming the field, and a bad
    bundle a traceback from inside uvicorn's lifespan)."""
    from typer.testing import CliRunner

    from rlaifv.cli.main import app

    for name in [n for n in os.environ if n.startswith("RLAIFV_")]:
        monkeypatch.delenv(name)
    result = CliRunner().invoke(app, ["serve", *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code == 2, result.output
    assert message.format(tmp=tmp_path) in result.output and "Traceback" not in result.output


def test_serve_finds_a_busy_port_before_loading_the_model(tmp_path, monkeypatch) -> None:
    """The port is bound before the model loads (a busy port was found after the whole load and warm-up)."""
    import socket

    from typer.testing import CliRunner

    from rlaifv.cli.main import app
    from rlaifv.service import serve_cli

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    loaded: list[bool] = []
    monkeypatch.setattr(serve_cli, "check_bundle", lambda bundle, **_: None)
    monkeypatch.setattr("rlaifv.service.app.create_app", lambda settings: loaded.append(True))
    port = busy.getsockname()[1]
    try:
        result = CliRunner().invoke(app, ["serve", "--bundle", str(tmp_path), "--port", str(port)])
    finally:
        busy.close()
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output, result.output
    assert not loaded


def test_every_setting_is_a_flag_of_serve_and_worker(monkeypatch) -> None:
    """RLAIFV_X is also --x on both commands (38 of 75 settings had no flag); a generated flag reaches Settings."""
    import inspect

    import typer
    from typer.testing import CliRunner

    from rlaifv.cli.main import app
    from rlaifv.service import serve_cli, worker_cli
    from rlaifv.service.worker_cli import worker

    for command in (serve_cli.serve, worker):
        assert set(Settings.model_fields) <= set(inspect.signature(command).parameters), command.__name__
    for name in ("serve", "worker"):  # every option with its setting's help
        shown = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "250"}).output
        assert "Bundle folder (rlaifv.json" in shown and "Most images per request" in shown, name
        assert "(default 4; env RLAIFV_MAX_IMAGES)" in shown and "(default PNG,JPEG,WEBP,GIF,BMP;" in shown, name
        assert ("--max-body-bytes" in shown) is (name == "serve")  # the worker has no API: not in its help
    for name in [n for n in os.environ if n.startswith("RLAIFV_")]:
        monkeypatch.delenv(name)
    built: list[Settings] = []

    def build(**given):
        built.append(Settings(**{k: v for k, v in given.items() if v is not None}))
        raise typer.Exit(0)

    monkeypatch.setattr(serve_cli, "build_settings", build)
    flags = ["--model-name", "m", "--no-warmup", "--allowed-image-hosts", "a.org,*.b.org", "--max-images", "3"]
    result = CliRunner().invoke(app, ["serve", *flags, "--vllm-reference", "inprocess", "--cache-ttl-s", "60"])
    assert result.exit_code == 0, result.output
    (settings,) = built
    assert (settings.model_name, settings.warmup, settings.max_images) == ("m", False, 3)
    assert settings.allowed_image_hosts == ["a.org", "*.b.org"] and settings.vllm_reference == "inprocess"
    assert settings.cache_ttl_s == 60
    monkeypatch.setattr(worker_cli, "build_settings", build)
    result = CliRunner().invoke(app, ["worker", "--max-body-bytes", "1000"])  # one environment serves both
    assert result.exit_code == 0, result.output
    assert built[-1].max_body_bytes == 1000


def test_a_second_server_cannot_take_the_port_while_the_first_loads() -> None:
    """bind() listens at once: a socket only bound (SO_REUSEADDR) let a second server bind the same port and load
    the whole model before failing."""
    import socket

    import typer

    from rlaifv.service.serve_cli import bind

    first = bind("127.0.0.1", 0, "--port")
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(typer.Exit):
            bind("127.0.0.1", port, "--port")
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # it accepts (the backlog) before serving
            pass
    finally:
        for sock in first:
            sock.close()


def test_the_settings_table_of_the_service_docs_lists_every_setting() -> None:
    """docs/service.md's table is where users look a setting up (two were missing from it)."""
    import re
    from pathlib import Path

    docs = (Path(__file__).parents[2] / "docs" / "service.md").read_text()
    table = docs[docs.index("## Settings") :]
    rows = {
        name
        for line in table.splitlines()
        if line.startswith("| `RLAIFV_")
        for name in re.findall(r"`(RLAIFV_\w+)`", line.split("|")[1])
    }
    names = {f"RLAIFV_{name.upper()}" for name in Settings.model_fields}
    assert names <= rows, f"not in docs/service.md's settings table: {sorted(names - rows)}"
    assert rows <= names, f"in the table but not settings: {sorted(rows - names)}"


def test_a_worker_whose_generator_is_unreachable_says_so_in_one_line(tiny_bundle, redis_url, monkeypatch) -> None:
    """It printed an 85-line traceback and exited 1."""
    from typer.testing import CliRunner

    from rlaifv.cli.main import app
    from rlaifv.testing.server import free_port

    for name in [n for n in os.environ if n.startswith("RLAIFV_")]:
        monkeypatch.delenv(name)
    args = ["worker", "--bundle", str(tiny_bundle), "--redis-url", redis_url, "--worker-port", "0"]
    result = CliRunner().invoke(app, [*args, "--generator-url", f"http://127.0.0.1:{free_port()}/v1"])
    assert result.exit_code == 2, result.output
    last = result.output.splitlines()[-1]
    assert last.startswith("error: generator") and "unreachable" in last and "Traceback" not in result.output


def test_port_0_gives_every_address_one_port_and_says_which(caplog) -> None:
    """`localhost` is 127.0.0.1 and ::1: with port 0 each got its own random port, and none was logged."""
    import logging

    from rlaifv.service.serve_cli import bind

    with caplog.at_level(logging.INFO, logger="rlaifv.service"):
        sockets = bind("localhost", 0, "--port / RLAIFV_PORT")
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1 and 0 not in ports
        (record,) = [r for r in caplog.records if r.getMessage() == "listening"]
        assert all(address.endswith(f":{ports.pop()}") for address in record.addresses)
    finally:
        for sock in sockets:
            sock.close()


def test_an_empty_host_is_refused_and_a_keys_file_may_note_its_keys(tmp_path) -> None:
    with pytest.raises(ValidationError, match=r"0\.0\.0\.0 or ::"):
        Settings(host=" ")
    keys = tmp_path / "keys"
    keys.write_text("sk-first-key-0123  # prod\n# a comment\nsk-second-key-456\t# staging\n")
    assert Settings(api_keys_file=keys).load_api_keys() == ["sk-first-key-0123", "sk-second-key-456"]


def test_urls_are_shown_without_credentials_and_ipv6_hosts_in_brackets() -> None:
    from rlaifv.service.urls import without_credentials

    assert without_credentials("http://u:pw@[::1]:8000/v1") == ("[::1]:8000", "http://[::1]:8000/v1")
    assert without_credentials("https://u:pw@gen.example:443/v1") == ("gen.example:443", "https://gen.example:443/v1")
    # a password with an unencoded '#' or '/' ended urlsplit's host part there: its rest was shown, or quoted by
    # urlsplit's own error as a port
    assert without_credentials("http://admin:12#s3cret@x.example/v1") == ("x.example", "http://x.example/v1")
    assert without_credentials("http://bob:s3cret/xyz@gen.example/v1") == ("gen.example", "http://gen.example/v1")


def test_the_device_is_checked_wherever_a_model_loads_in_the_process(tiny_bundle) -> None:
    """The vLLM engine's in-process reference loads on RLAIFV_DEVICE: its device went unchecked before the load."""
    from rlaifv.service.serve_cli import bundle_checks

    served = Settings(engine="vllm", vllm_policy_url="http://p:1/v1", vllm_reference_url="http://r:2/v1")
    inprocess = Settings(engine="vllm", vllm_policy_url="http://p:1/v1", vllm_reference="inprocess")
    assert bundle_checks(served)["loads_here"] is False and bundle_checks(inprocess)["loads_here"] is True
    assert bundle_checks(Settings()) == {"weights": True, "device": None, "loads_here": True}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("https://images.example.com", "is a URL: list the host alone"),
        ("images.example.com:99999", "has port '99999', not a number from 1 to 65535"),
        ("images.example.com:abc", "has port 'abc'"),
        ("10.0.0.0/33", "is not an IP address or CIDR network"),
        ("[fd00::1", "has no ']'"),
        ("images example.com", "is not a host name"),
        ("*", "is not a host name"),
    ],
)
def test_allowed_image_hosts_entries_that_match_nothing_are_refused(value: str, problem: str) -> None:
    """A typo in an entry matched no host: every image of that host was refused, or a /33 network allowed nothing."""
    with pytest.raises(ValidationError, match="allowed_image_hosts") as info:
        Settings(allowed_image_hosts=value)
    assert problem in str(info.value)


def test_allowed_image_hosts_may_start_with_an_ipv6_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value starting with '[' was read as JSON only: an IPv6 first entry failed the start-up."""
    monkeypatch.setenv("RLAIFV_ALLOWED_IMAGE_HOSTS", "[::1]:8080, images.example.com,10.0.0.0/8:*")
    assert Settings().allowed_image_hosts == ["[::1]:8080", "images.example.com", "10.0.0.0/8:*"]
    monkeypatch.setenv("RLAIFV_ALLOWED_IMAGE_HOSTS", '["[::1]:8080", "images.example.com"]')
    assert Settings().allowed_image_hosts == ["[::1]:8080", "images.example.com"]
    monkeypatch.setenv("RLAIFV_ALLOWED_IMAGE_HOSTS", '["images.example.com"')
    with pytest.raises(ValidationError, match="allowed_image_hosts\n  Value error, Expecting ',' delimiter"):
        Settings()

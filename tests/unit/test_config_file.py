"""``--config FILE`` for ``fdpd launch`` and ``fdpd up``: one schema for flags, ``FDPD_*``
environment variables and YAML keys; precedence flag > env > file > default; unknown keys and
bad values rejected at start with a message naming the key."""

from __future__ import annotations

import dataclasses
import re

import pytest
from click.testing import CliRunner

from fdpd.cli import main
from fdpd.config import EngineConfig, InstanceConfig, PDConfig


@pytest.fixture
def started(entry_points):
    """Runs ``fdpd ...`` with the process entry points replaced by recorders."""

    def invoke(args: list[str], env: dict[str, str] | None = None, code: int = 0):
        result = CliRunner().invoke(main, args, env=env or {}, catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result, entry_points

    return invoke


def write(tmp_path, text: str, name: str = "fdpd.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


DECODE = ["launch", "--role", "decode", "--router", "127.0.0.1:8001"]


def test_yaml_values_reach_every_schema(started, tmp_path):
    cfg = write(tmp_path, "num-kv-blocks: 128\nblock_size: 32\nreserve-tokens: 64\n"
                          "grant_ttl: 2.5\nenable-prefix-caching: false\n"
                          "kv-store: redis://redis:6379/0\ninstance-id: decode-7\n"
                          "metrics_port: 9100\ntorch-threads: 2\n")
    _, calls = started([*DECODE, "--config", cfg])
    got = calls["instance"]
    assert got["engine"].num_kv_blocks == 128 and got["engine"].block_size == 32
    assert got["engine"].enable_prefix_caching is False
    assert got["engine"].kv_store == "redis://redis:6379/0"
    assert got["pd"].reserve_tokens == 64 and got["pd"].grant_ttl == 2.5
    assert got["inst"].instance_id == "decode-7" and got["inst"].metrics_port == 9100
    assert got["torch_threads"] == 2


def test_precedence_flag_over_env_over_file_over_default(started, tmp_path):
    cfg = write(tmp_path, "num_kv_blocks: 128\nreserve_tokens: 64\nmax_num_seqs: 8\n")
    env = {"FDPD_NUM_KV_BLOCKS": "256", "FDPD_RESERVE_TOKENS": "32"}
    _, calls = started([*DECODE, "--config", cfg, "--num-kv-blocks", "512"], env)
    got = calls["instance"]
    assert got["engine"].num_kv_blocks == 512          # flag beats env and file
    assert got["pd"].reserve_tokens == 32              # env beats file
    assert got["engine"].max_num_seqs == 8             # file beats default
    assert got["engine"].max_num_batched_tokens == EngineConfig().max_num_batched_tokens


def test_env_bool_beats_file_bool(started, tmp_path):
    cfg = write(tmp_path, "enable_prefix_caching: false\n")
    _, calls = started([*DECODE, "--config", cfg], {"FDPD_ENABLE_PREFIX_CACHING": "true"})
    assert calls["instance"]["engine"].enable_prefix_caching is True


def test_config_file_from_env_and_role_from_file(started, tmp_path):
    cfg = write(tmp_path, "role: router\nport: 9000\napi-key: s3cret\n")
    _, calls = started(["launch"], {"FDPD_CONFIG": cfg})
    assert calls["router"]["port"] == 9000 and calls["router"]["api_key"] == "s3cret"


def test_null_means_default(started, tmp_path):
    cfg = write(tmp_path, "kv_store: null\nnum_kv_blocks: ~\n")
    _, calls = started([*DECODE, "--config", cfg])
    assert calls["instance"]["engine"].kv_store is None
    assert calls["instance"]["engine"].num_kv_blocks is None


@pytest.mark.parametrize("text, message", [
    ("num-kv-blockz: 128\n", "unknown key 'num-kv-blockz'; known keys: advertise-address, "
                             "advertise-host"),
    ("block_size: abc\n", "key 'block_size': 'abc' is not a valid integer"),
    ("enable_prefix_caching: maybe\n", "key 'enable_prefix_caching': 'maybe' is not a valid "
                                       "boolean"),
    ("block-size: 16\nblock_size: 32\n", "key 'block_size' is given twice"),
    ("block_size: [16, 32]\n", "key 'block_size': expected a single value, got a list"),
    ("- block_size\n", "expected a mapping of option names to values, got a list"),
    ("block_size: [16\n", "not valid YAML"),
])
def test_bad_files_are_rejected_naming_the_key(started, tmp_path, text, message):
    cfg = write(tmp_path, text)
    result, calls = started([*DECODE, "--config", cfg], code=2)
    assert message in result.output and cfg in result.output, result.output
    assert not calls


def test_invalid_value_from_file_names_key_and_file(started, tmp_path):
    cfg = write(tmp_path, "block_size: 24\n")
    result, _ = started([*DECODE, "--config", cfg], code=2)
    assert "must be a power of two, got 24" in result.output
    assert f"from key 'block_size' of {cfg}" in result.output, result.output
    # The same bad value from the environment says so.
    result, _ = started(DECODE, {"FDPD_BLOCK_SIZE": "24"}, code=2)
    assert "from FDPD_BLOCK_SIZE" in result.output, result.output


def test_missing_file_is_an_error(started, tmp_path):
    result, _ = started([*DECODE, "--config", str(tmp_path / "nope.yaml")], code=2)
    assert "nope.yaml" in result.output and "does not exist" in result.output


def test_one_file_serves_up_and_its_launch_processes(started, tmp_path):
    cfg = write(tmp_path, "num-prefill: 2\nnum_decode: 3\nport: 9000\nmodel: tiny\n"
                          "num_kv_blocks: 64\nlog-format: json\n")
    _, calls = started(["up", "--config", cfg, "--num-decode", "1"])
    cluster = calls["cluster"]
    assert (cluster["num_prefill"], cluster["num_decode"], cluster["port"]) == (2, 1, 9000)
    common = cluster["common"]
    assert common[:2] == ["--config", cfg]
    assert common[common.index("--log-format") + 1] == "json"
    # The launch processes accept the same file (its `up` keys are known there, and ignored).
    calls.clear()
    _, calls = started([*DECODE, "--config", cfg, "--port", "0"])
    assert calls["instance"]["engine"].num_kv_blocks == 64


def test_up_rejects_unknown_keys(started, tmp_path):
    cfg = write(tmp_path, "num-prefil: 2\n")
    result, calls = started(["up", "--config", cfg], code=2)
    assert "unknown key 'num-prefil'" in result.output and not calls


def test_launch_help_documents_every_option_with_its_default():
    result = CliRunner().invoke(main, ["launch", "--help"], terminal_width=200)
    assert result.exit_code == 0
    # One chunk of help per option: from its flag to the next option's.
    chunks = {m.group(1): m.group(0) for m in
              re.finditer(r"^  (--[a-z-]+)(?:/--[a-z-]+)?\b.*?(?=^  -|\Z)", result.output,
                          re.MULTILINE | re.DOTALL)}
    for schema in (InstanceConfig, EngineConfig, PDConfig):
        for f in dataclasses.fields(schema):
            flag = "--" + f.name.replace("_", "-")
            chunk = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(chunks[flag].split()))
            assert f.metadata["help"].split()[0] in chunk, flag
            assert f"env var: FDPD_{f.name.upper()}" in chunk, chunk
            if f.default is not None:
                # click shows a boolean flag's default as the flag that is on by default.
                default = (flag[2:] if f.default else "no-" + flag[2:]) \
                    if isinstance(f.default, bool) else f.default
                assert f"default: {default}" in chunk.lower(), chunk
    for flag in ("--config", "--log-level", "--log-format", "--control-port", "--api-key",
                 "--torch-threads"):
        assert flag in chunks, flag


def test_advertised_address():
    from fdpd.config import advertised_address

    assert advertised_address("tcp://127.0.0.1:7000", None) == "tcp://127.0.0.1:7000"
    assert advertised_address("tcp://0.0.0.0:7000", "decode-1") == "tcp://decode-1:7000"
    assert advertised_address("tcp://127.0.0.1:7000", "10.0.0.5") == "tcp://10.0.0.5:7000"
    import socket

    assert advertised_address("tcp://0.0.0.0:7000", None) == \
        f"tcp://{socket.gethostname()}:7000"
    with pytest.raises(ValueError, match="metrics_port"):
        InstanceConfig(metrics_port=-2)
